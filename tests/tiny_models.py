"""Throwaway random models for tests, built in about a second, in the artifact layout.

``make_tiny_model(root, "tiny-llama")`` writes ``root/tiny-llama/`` with config, random safetensors
weights, a byte-level BPE tokenizer trained on a few lines, a chat template and ``manifest.json``.
"""

from __future__ import annotations

from pathlib import Path

TRAIN_TEXT = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "All the world's a stage, and all the men and women merely players.",
    "Hello world! The quick brown fox jumps over the lazy dog 0123456789.",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN_TEXT * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(root: Path, name: str = "tiny-llama", arch: str = "llama", seed: int = 0,
                    dtype: str = "float32", max_position_embeddings: int = 512) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    from protocol.artifacts import write_manifest

    torch.manual_seed(seed)
    tok = make_tokenizer()
    vocab = len(tok)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=max_position_embeddings, tie_word_embeddings=True)
    elif arch == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=max_position_embeddings, tie_word_embeddings=True)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4,
                         n_positions=max_position_embeddings)
    else:
        raise ValueError(arch)
    cfg.eos_token_id = tok.eos_token_id
    cfg.bos_token_id = tok.bos_token_id
    cfg.pad_token_id = tok.pad_token_id
    model = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype))
    # Random init gives near-uniform logits; scale weights so greedy decoding is decisive.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    out = Path(root) / name
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    write_manifest(out, name, source="test:random")
    return out
