"""Incremental detokenization: token ids in, UTF-8-safe text deltas out, stop strings cut.

Decoding one token at a time is wrong for both byte-level BPE (a multi-byte character can span
tokens) and sentencepiece (a token's leading space depends on what precedes it). So, like vLLM, we
decode a short *window* of tokens twice: once up to the last emitted token (``prefix``) and once
including the new tokens; the new text is the difference. While the window ends in an incomplete
UTF-8 sequence (the decoder yields U+FFFD), nothing is emitted and the window grows.

Stop strings: text that could still be the beginning of a stop string is held back; when a stop
string appears, the text before it is emitted and the rest is dropped.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"
# Tokens of context kept in front of the window so sentencepiece's leading-space logic sees a word.
PREFIX_WINDOW = 5


class TokenTextCache:
    """``token_text(id)``: one token's own text (for logprobs), memoised per tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


class IncrementalDetokenizer:
    """One per sequence. ``add(ids)`` returns the text that is safe to show now.

    ``prompt_ids`` (the tail of the prompt) only give the first window its context; they are never
    part of the output. ``stop`` is the request's list of stop strings.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int] | None = None,
                 stop: list[str] | None = None, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids or [])[-PREFIX_WINDOW:]
        self.ids: list[int] = context
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.stop = [s for s in (stop or []) if s]
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""  # all decoded output text so far (including held-back text)
        self.emitted = 0  # characters of ``text`` already returned
        self.stopped = False  # a stop string was found; nothing more will be emitted
        self.stop_string: str | None = None

    @classmethod
    def resumed(cls, tokenizer: Any, prompt_ids: list[int], delivered_ids: list[int], delivered_chars: int,
                stop: list[str] | None = None) -> IncrementalDetokenizer:
        """The state an earlier detokenizer reached after ``delivered_ids`` had been shown as
        ``delivered_chars`` characters: tokens are replayed one at a time (as they were generated),
        so whatever it held back then is still pending now."""
        detok = cls(tokenizer, prompt_ids, stop)
        for t in delivered_ids:
            detok.ids.append(t)
            new = detok._decode_new()
            detok.text += new
        detok.emitted = min(delivered_chars, len(detok.text))
        return detok

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_new(self) -> str:
        """Text of the tokens after ``read_offset``, or "" while it ends in a partial character."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        pending = len(self.ids) - self.read_offset
        # A UTF-8 character is at most 4 bytes; past that, the bytes are simply invalid: show them.
        if full.endswith(REPLACEMENT) and pending < 4:
            return ""
        if full.startswith(prefix):
            new = full[len(prefix):]
        else:  # a decoder that rewrote earlier text (cleanup rules): emit what differs
            common = 0
            for a, b in zip(prefix, full, strict=False):
                if a != b:
                    break
                common += 1
            new = full[common:]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return new

    def add(self, token_ids: list[int]) -> str:
        """Append generated tokens; return the new text that can be shown (maybe "")."""
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        new = self._decode_new()
        if not new:
            return ""
        self.text += new
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of generation: return everything held back (a partial character included)."""
        if self.stopped:
            return ""
        if self.read_offset < len(self.ids):
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            full = self._decode(self.ids[self.prefix_offset:])
            self.text += full[len(prefix):] if full.startswith(prefix) else ""
            self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop:
            # A stop string cannot start before ``emitted``: such a start would have been held back.
            start = max(0, self.emitted - self._max_stop + 1)
            cut = -1
            for s in self.stop:
                i = self.text.find(s, start)
                if i != -1 and (cut == -1 or i < cut):
                    cut, self.stop_string = i, s
            if cut != -1:
                cut = max(cut, self.emitted)
                out = self.text[self.emitted:cut]
                self.emitted = cut
                self.stopped = True
                return out
        end = len(self.text)
        if self.stop and not final:
            end -= self._held_back()
        out = self.text[self.emitted:end]
        self.emitted = end
        return out

    def _held_back(self) -> int:
        """Length of the longest unemitted suffix of ``text`` that begins some stop string."""
        pending = len(self.text) - self.emitted
        for k in range(min(self._max_stop - 1, pending), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
