"""Per-model tokenizers, loaded from the artifact volume on a small thread pool.

The gateway tokenizes every prompt itself (chat template included) so that a prompt too long for the
model's context is a 400 before anything is queued, and so that usage counts match the tokenizer.
Loading, template rendering and encoding all run on ``TokenizerCache``'s own threads, never on the
event loop. The cache holds at most ``max_models`` tokenizers (least recently used goes first) and
reloads a model whose manifest changed (the model-manager replaced it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from protocol.artifacts import ArtifactStore, InvalidModelName, Manifest
from protocol.errors import APIError, not_found

log = logging.getLogger("gateway.tokenization")
T = TypeVar("T")

FALLBACK_CONTEXT = 2048


def model_not_found(name: str) -> APIError:
    return not_found(f"The model '{name}' does not exist", param="model")


def fallback_chat_prompt(messages: list[dict[str, str]]) -> str:
    """For tokenizers without a chat template: ``role: content`` lines, then ``assistant:``."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"])


def context_length(model_dir: Path, manifest: Manifest, tokenizer: Any) -> int:
    if manifest.context_length > 0:
        return manifest.context_length
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
            if isinstance(cfg.get(key), int) and cfg[key] > 0:
                return cfg[key]
    except (OSError, ValueError):
        pass
    limit = getattr(tokenizer, "model_max_length", 0)
    return limit if isinstance(limit, int) and 0 < limit < 10_000_000 else FALLBACK_CONTEXT


@dataclass
class ModelTokenizer:
    name: str
    path: Path
    manifest: Manifest
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    context_length: int

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode_prompt(self, text: str) -> list[int]:
        """A raw prompt, with the tokenizer's special tokens (BOS) as ``tokenizer(text)`` adds them."""
        try:
            return list(self.tokenizer(text)["input_ids"])
        except Exception as e:  # the tokenizer refused this input
            raise APIError(400, f"The prompt could not be tokenized: {e}", param="prompt",
                           code="tokenization_error") from e

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Messages through the chat template with the generation prompt, as transformers does it."""
        if not getattr(self.tokenizer, "chat_template", None):
            return list(self.tokenizer(fallback_chat_prompt(messages), add_special_tokens=False)["input_ids"])
        try:
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)
        except Exception as e:  # jinja raises for conversations the template refuses
            raise APIError(400, f"The model's chat template rejected the messages: {e}",
                           param="messages", code="chat_template_error") from e
        return list(out["input_ids"])


class TokenizerCache:
    def __init__(self, store: ArtifactStore, max_models: int = 8, threads: int = 2):
        self.store = store
        self.max_models = max_models
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tokenize")
        self._cache: OrderedDict[str, ModelTokenizer] = OrderedDict()
        self._lock = threading.Lock()  # guards _cache; loads run under it (one model at a time)

    async def run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _lookup(self, name: str) -> tuple[Path, Manifest]:
        try:
            path = self.store.find(name)
        except InvalidModelName:
            path = None
        if path is None:
            raise model_not_found(name)
        try:
            return path, self.store.manifest(name)  # type: ignore[return-value]
        except (OSError, ValueError) as e:
            raise model_not_found(name) from e

    async def lookup(self, name: str) -> tuple[Path, Manifest]:
        """The model's directory and manifest; a 404 APIError if there is no such model."""
        return await self.run(self._lookup, name)

    def _get(self, name: str) -> ModelTokenizer:
        path, manifest = self._lookup(name)
        with self._lock:
            cached = self._cache.get(name)
            if cached and cached.path == path and cached.manifest.created == manifest.created:
                self._cache.move_to_end(name)
                return cached
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(path)
            except Exception as e:
                log.exception("loading the tokenizer of %s failed", name)
                raise APIError(500, f"The tokenizer of model '{name}' could not be loaded: {e}",
                               "server_error", "model", "tokenizer_error") from e
            entry = ModelTokenizer(name, path, manifest, tok, context_length(path, manifest, tok))
            self._cache[name] = entry
            while len(self._cache) > self.max_models:
                self._cache.popitem(last=False)
            log.info("loaded tokenizer of %s (context %d)", name, entry.context_length)
            return entry

    async def get(self, name: str) -> ModelTokenizer:
        return await self.run(self._get, name)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
