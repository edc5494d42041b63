"""Request bodies: OpenAI chat/completions, the native ``/generate`` and ``/stream``, llama.cpp's
``/completion``.

Models are strict (``"5"`` is not an integer, ``true`` is not a number) and ignore unknown fields,
like OpenAI's API. Features we do not implement (tools, JSON mode, logit_bias, echo, suffix,
best_of > 1, non-text content parts) are rejected with a 400 naming the field rather than
silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from protocol.errors import ErrorResponse  # noqa: F401 (re-exported: the routes document their errors with it)
from protocol.messages import SamplingParams

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP_STRINGS = 16
MAX_MESSAGES = 4096

MaxTokens = Annotated[int, Field(ge=1, le=10_000_000)]
Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]


def _valid_unicode(value: Any) -> None:
    """JSON escapes can smuggle lone surrogates (``"\\ud800"``) into a str: tokenizers and the job's JSON
    cannot take them, so they are a 400 here."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (it contains a lone surrogate)") from None
    elif isinstance(value, list) and value and not isinstance(value[0], int):
        for item in value:
            _valid_unicode(item)
    elif isinstance(value, dict):
        for k, item in value.items():
            _valid_unicode(k)
            _valid_unicode(item)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @field_validator("*", mode="after")
    @classmethod
    def _no_lone_surrogates(cls, v: Any) -> Any:
        _valid_unicode(v)
        return v


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_Strict):
    """The sampling parameters every generation endpoint accepts (None: the endpoint's default)."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="0 or -1: off")
    min_p: float | None = Field(None, ge=0, le=1)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported")
        if any(not s for s in items):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > 512 for s in items):
            raise ValueError("stop strings must be at most 512 characters")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling(self, max_tokens: int, logprobs: int | None = None,
                 defaults: dict[str, Any] | None = None) -> SamplingParams:
        """The protocol's ``SamplingParams``: given fields, else ``defaults``, else the protocol's."""
        values: dict[str, Any] = dict(defaults or {})
        for name in ("temperature", "top_p", "min_p", "seed", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            v = getattr(self, name)
            if v is not None:
                values[name] = v
        if self.top_k is not None:
            values["top_k"] = max(0, self.top_k)
        return SamplingParams(max_tokens=max_tokens, stop=self.stop_list(), ignore_eos=self.ignore_eos,
                              logprobs=logprobs, **values)


# Choices per request (OpenAI allows up to 128); each is one job, so this also bounds the fan-out.
MAX_CHOICES = 16


def _only_1(v: int) -> int:
    if v != 1:
        raise ValueError("only best_of=1 is supported")
    return v


class _OpenAIFields(SamplingFields):
    model: str | None = Field(None, description="Model name; the gateway's default model when omitted")
    max_tokens: MaxTokens | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices to generate for the prompt; each is a job of "
                   "its own (a queue slot, a concurrency slot and its tokens in the rate limits); with a seed, "
                   "choice i samples with seed + i")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    logit_bias: dict[str, float] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ContentPart(_Strict):
    type: str
    text: str = ""

    @field_validator("type")
    @classmethod
    def _text_only(cls, v: str) -> str:
        if v != "text":
            raise ValueError(f"content parts of type {v!r} are not supported (only 'text')")
        return v


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def for_template(self) -> dict[str, str]:
        out = {"role": self.role, "content": self.text()}
        if self.name:
            out["name"] = self.name
        return out


class ChatCompletionRequest(_OpenAIFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if v:
            raise ValueError("tools are not supported")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if v not in (None, "none", "auto"):
            raise ValueError("tool_choice is not supported")
        return v

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v and v.get("type", "text") != "text":
            raise ValueError("only response_format type 'text' is supported")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_OpenAIFields):
    prompt: Prompt
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Prompt) -> Prompt:
        if isinstance(v, list) and v and isinstance(v[0], str | list) and len(v) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return v

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int | None:
        if v is not None:
            _only_1(v)
        return v

    def prompt_value(self) -> str | list[int]:
        """The single prompt: text or token ids."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            return p[0]  # type: ignore[return-value]
        return p  # type: ignore[return-value]


class GenerateRequest(SamplingFields):
    """``POST /generate`` and ``POST /stream`` (the TorchWeave seed's API)."""

    prompt: str = Field(min_length=1)
    model: str | None = None
    max_new_tokens: MaxTokens | None = None
    max_length: MaxTokens | None = Field(None, description="Alias of max_new_tokens (new tokens, not total)")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_new_tokens if self.max_new_tokens is not None else self.max_length


class LlamaCompletionRequest(_Strict):
    """``POST /completion`` in llama.cpp server's shape (and its defaults)."""

    prompt: str | list[int]
    model: str | None = None
    n_predict: int = Field(-1, ge=-1, le=10_000_000, description="-1: the gateway's default")
    temperature: float = Field(0.8, ge=0, le=2)
    top_k: int = Field(40, ge=-1)
    top_p: float = Field(0.95, gt=0, le=1)
    min_p: float = Field(0.05, ge=0, le=1)
    seed: Seed = Field(-1, description="-1: random")
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    repeat_penalty: float = Field(1.0, gt=0, le=10)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    ignore_eos: bool = False
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str]) -> list[str]:
        if any(not s or len(s) > 512 for s in v):
            raise ValueError("stop strings must be 1 to 512 characters")
        return v

    @field_validator("n_predict")
    @classmethod
    def _n_predict(cls, v: int) -> int:
        if v == 0:
            raise ValueError("n_predict must be -1 (the default) or at least 1")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return None if self.n_predict == -1 else self.n_predict

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_k=max(0, self.top_k), top_p=self.top_p,
            min_p=self.min_p, seed=None if self.seed == -1 else self.seed, stop=list(self.stop),
            repetition_penalty=self.repeat_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, ignore_eos=self.ignore_eos)
