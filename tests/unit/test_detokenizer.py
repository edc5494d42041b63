"""Incremental detokenizer: UTF-8 safety on byte-level BPE and sentencepiece-style tokenizers, stops."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.tiny_models import make_tokenizer
from worker.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer, TokenTextCache


def make_sentencepiece_tokenizer():
    """A Llama-style tokenizer: '▁' for spaces, byte fallback for characters not in the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(256):
        vocab[f"<0x{i:02X}>"] = len(vocab)
    for c in "▁abcdefghijklmnopqrstuvwxyzTH,.:'!?":
        vocab.setdefault(c, len(vocab))
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("t", "o"), ("▁", "b"), ("▁b", "e")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


BPE = make_tokenizer()
SP = make_sentencepiece_tokenizer()
TOKENIZERS = {"byte-bpe": BPE, "sentencepiece": SP}
TEXTS = ["To be, or not to be, that is the question:", "héllo wörld 日本語 🙂🙃 done",
         "the tobe é日🙂 be", "  two  spaces and\nnewline"]


def stream(tok, text: str, stop: list[str] | None = None, one_at_a_time: bool = True) -> list[str]:
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, stop=stop)
    chunks = [d.add([i]) for i in ids] if one_at_a_time else [d.add(ids)]
    chunks.append(d.flush())
    return chunks


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode_and_no_partial_chars(name: str, text: str) -> None:
    tok = TOKENIZERS[name]
    ids = tok.encode(text, add_special_tokens=False)
    chunks = stream(tok, text)
    assert "".join(chunks) == tok.decode(ids, skip_special_tokens=True)
    assert not any(REPLACEMENT in c for c in chunks)


def test_multibyte_character_split_over_byte_tokens_is_held_back() -> None:
    ids = BPE.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1  # the tiny vocabulary has no emoji: it is spelled in byte tokens
    d = IncrementalDetokenizer(BPE)
    assert [d.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert d.add([ids[-1]]) == "🙂"


def test_prompt_context_is_not_emitted() -> None:
    prompt = SP.encode("the", add_special_tokens=False)
    d = IncrementalDetokenizer(SP, prompt_ids=prompt)
    out = "".join(d.add([i]) for i in SP.encode(" be", add_special_tokens=False)[1:])
    # "▁be" after a prompt keeps its leading space
    assert out == " be"


def test_stop_string_is_cut_and_never_leaked() -> None:
    text = "To be, or not to be, that is the question:"
    chunks = stream(BPE, text, stop=["that is the q"])
    assert "".join(chunks) == "To be, or not to be, "
    assert not any("th" in c for c in chunks[-3:])


def test_partial_stop_match_is_released_when_it_diverges() -> None:
    text = "To be, or not to be, that is"
    ids = BPE.encode(text)
    d = IncrementalDetokenizer(BPE, stop=["not to go"])
    shown = ""
    for n, i in enumerate(ids, 1):
        shown += d.add([i])
        full = BPE.decode(ids[:n])
        if full.endswith("not to"):
            assert not shown.endswith("not to")  # held back: could be the start of the stop string
    shown += d.flush()
    assert shown == text and not d.stopped


def test_earliest_stop_wins_and_stop_string_recorded() -> None:
    d = IncrementalDetokenizer(BPE, stop=["question", "be,"])
    out = "".join(d.add([i]) for i in BPE.encode("To be, or not to be, that is the question"))
    assert out == "To " and d.stopped and d.stop_string == "be,"
    assert d.add(BPE.encode(" more")) == "" and d.flush() == ""


def test_token_text_cache() -> None:
    cache = TokenTextCache(BPE)
    tid = BPE.encode(" be")[0]
    assert cache(tid) == BPE.decode([tid]) == cache(tid)


ALPHABET = st.sampled_from(list("abthe o,.:!?é日🙂\n "))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(ALPHABET, min_size=0, max_size=40), stops=st.lists(st.text(ALPHABET, min_size=1,
       max_size=4), max_size=3), name=st.sampled_from(sorted(TOKENIZERS)))
def test_property_stream_matches_reference(text: str, stops: list[str], name: str) -> None:
    tok = TOKENIZERS[name]
    ids = tok.encode(text, add_special_tokens=False)
    full = tok.decode(ids, skip_special_tokens=True)
    chunks = stream(tok, text, stop=stops)
    cuts = [full.find(s) for s in stops if s and full.find(s) != -1]
    expected = full[: min(cuts)] if cuts else full
    assert "".join(chunks) == expected
    assert not any(REPLACEMENT in c for c in chunks[:-1])
