"""A random-weight model in the shape of SmolLM2-135M and a tokenizer with its vocabulary size.

Nothing is downloaded: the config is written out by hand (30 layers, hidden 576, 9 heads, 3 KV
heads, vocab 49152) and the tokenizer is a word-level one whose 49152 entries decode to short words,
so detokenization does real work. ``make_artifact(dir)`` writes it in the artifact layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

VOCAB = 49152


def smollm_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )


def make_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0}
    for i in range(1, VOCAB):
        vocab[f"\u0120w{i}"] = i  # "Ġ" = a leading space in byte-level BPE notation
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def make_model(dtype: str = "bfloat16", seed: int = 0) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(smollm_config(), dtype=getattr(torch, dtype))
    return model.eval()


def make_artifact(root: Path, name: str = "smollm2-135m-random", dtype: str = "bfloat16") -> Path:
    from protocol.artifacts import MANIFEST, write_manifest

    out = Path(root) / name
    if not (out / "config.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        make_model(dtype).save_pretrained(out, safe_serialization=True)
        make_tokenizer().save_pretrained(out)
    if not (out / MANIFEST).exists():  # the worker serves artifacts only (bench over HTTP)
        write_manifest(out, name, source="bench:random")
    return out
