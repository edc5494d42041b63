"""A takeover resumes the detokenizer exactly where the dead worker's client stopped receiving text."""

from __future__ import annotations

import pytest

from worker.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tok():
    from tests.tiny_models import make_tokenizer

    return make_tokenizer()


@pytest.mark.parametrize("stop", [[], ["the q"], ["ü!"]])
def test_resumed_detokenizer_continues_the_same_text(tok, stop):
    prompt = tok.encode("Hello")
    ids = tok.encode(" whether 'tis nobler, ü! the question: é€ 0123 the quick brown fox")
    for cut in range(1, len(ids)):
        full = IncrementalDetokenizer(tok, prompt, stop)
        whole = "".join(full.add([t]) for t in ids) + full.flush()
        first = IncrementalDetokenizer(tok, prompt, stop)
        shown = "".join(first.add([t]) for t in ids[:cut])
        resumed = IncrementalDetokenizer.resumed(tok, prompt, ids[:cut], len(shown), stop)
        rest = "".join(resumed.add([t]) for t in ids[cut:]) + resumed.flush()
        assert shown + rest == whole, f"cut at {cut}"
