"""Versioned messages that cross Redis. Every message carries ``v`` (the protocol version).

A ``Job`` goes gateway -> worker as one field (``job``) of a stream entry. Workers answer with
``EventBatch`` messages on the gateway's channel: all of one engine step's ``TokenEvent`` for that
gateway in one PUBLISH. ``seq`` counts events per request from 0, so a gateway drops duplicates
after a takeover and notices gaps.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field

from protocol import PROTOCOL_VERSION

FinishReason = Literal["stop", "length", "cancelled", "error", "timeout"]

# -inf (a token the sampler filtered out) and NaN are not JSON: logprobs are floored here, once, for
# every producer, so an EventBatch always survives its own encode/decode (OpenAI also floors at -9999).
MIN_LOGPROB = -9999.0


def _finite_logprob(x: float) -> float:
    return MIN_LOGPROB if math.isnan(x) or x < MIN_LOGPROB else x


Logprob = Annotated[float, AfterValidator(_finite_logprob)]


class SamplingParams(BaseModel):
    """Per-request sampling, the union of what OpenAI, llama.cpp and the native API accept."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N alternatives per token; None = off
    n: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5 or self.top_k == 1


class Job(BaseModel):
    v: int = PROTOCOL_VERSION
    request_id: str
    gateway_id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    created_at: float = Field(default_factory=time.time)
    deadline: float | None = None  # unix time after which the job is dropped
    # Tokens already delivered to the client (set when a job is re-queued after a worker died).
    resume_token_ids: list[int] = Field(default_factory=list)
    trace: dict[str, str] = Field(default_factory=dict)  # W3C trace context carrier

    def to_fields(self) -> dict[str, str]:
        return {"job": self.model_dump_json()}

    @classmethod
    def from_fields(cls, fields: dict) -> Job:
        raw = fields.get("job") or fields.get(b"job")
        if isinstance(raw, bytes):
            raw = raw.decode()
        return cls.model_validate_json(raw)


class TokenLogprob(BaseModel):
    token_id: int
    token: str
    logprob: Logprob
    top: list[tuple[int, str, Logprob]] = Field(default_factory=list)


class TokenEvent(BaseModel):
    request_id: str
    seq: int
    token_ids: list[int] = Field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    # With finish_reason "stop": the stop string that ended the generation (None: an EOS/stop token).
    stop_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far, including these tokens
    logprobs: list[TokenLogprob] | None = None
    worker_id: str = ""
    # Seconds the job waited in the queue before a worker took it (sent with the first event).
    queue_time: float | None = None


class EventBatch(BaseModel):
    v: int = PROTOCOL_VERSION
    events: list[TokenEvent]

    def encode(self) -> str:
        return self.model_dump_json(exclude_defaults=False)

    @classmethod
    def decode(cls, data: str | bytes) -> EventBatch:
        return cls.model_validate_json(data)


class WorkerInfo(BaseModel):
    """What a worker advertises in its heartbeat key."""

    v: int = PROTOCOL_VERSION
    worker_id: str
    models: list[str]
    device: str
    dtype: str
    engine: str
    max_batch: int
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    started_at: float = Field(default_factory=time.time)
    heartbeat_at: float = Field(default_factory=time.time)
    draining: bool = False
    metrics_port: int = 0


class CancelMessage(BaseModel):
    v: int = PROTOCOL_VERSION
    request_ids: list[str]


class ControlMessage(BaseModel):
    """model-manager -> workers on ``keys.CONTROL_CHANNEL``: load or unload a model.

    ``worker_id`` None means every worker decides for itself (a "load" is taken by workers that have
    room for it; an "unload" is done by every worker serving the model). ``model`` is a validated
    artifact name (``protocol.artifacts.validate_name``).
    """

    v: int = PROTOCOL_VERSION
    action: Literal["load", "unload"]
    model: str
    worker_id: str | None = None
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = Field(default_factory=time.time)

    def encode(self) -> str:
        return self.model_dump_json()

    @classmethod
    def decode(cls, data: str | bytes) -> ControlMessage:
        return cls.model_validate_json(data)


class IdempotencyMeta(BaseModel):
    """What a request with an ``Idempotency-Key`` needs so another gateway can re-attach to its
    stream (the ``meta`` field of its record, ``keys.idempotency_key``): the response's kind and the
    values every chunk repeats."""

    v: int = PROTOCOL_VERSION
    kind: Literal["chat", "text", "generate", "llama"]
    stream: bool = False
    model: str
    created: int = 0
    include_usage: bool = False
    prompt_tokens: int = 0
    gateway_id: str  # whose events channel the job's tokens are published on


def dumps(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"))
