"""Load test for a spindle deployment with locust (``pip install -e '.[load]'``): see deploy/load/README.md.

Each simulated user sends chat completions, streaming and not, with short, medium and long prompts,
and waits a little between requests. Locust's table then shows, per request name:

- ``chat``: non-streaming requests, time to the whole answer;
- ``chat stream``: streaming requests, time to ``[DONE]``;
- ``TTFT chat stream``: time to the first content token of each stream;
- ``TPOT chat stream``: time per output token after the first (the decode pace a user sees).

429 and 503 answers count as failures named by their error code (``queue_full``,
``rate_limit_exceeded``, ``shutting_down`` ...); the user then waits ``Retry-After`` (at most
``SPINDLE_MAX_BACKOFF`` seconds) before its next request, as a well-behaved client does.

Environment: ``SPINDLE_API_KEY`` (sent as ``Authorization: Bearer``; empty when auth is off),
``SPINDLE_MODEL`` (empty: the gateway's default model), ``SPINDLE_MAX_TOKENS`` (64),
``SPINDLE_STREAM_SHARE`` (0.5: the share of streaming requests), ``SPINDLE_PROMPT_WORDS`` (``8,60,250``:
the three prompt sizes in words, sent in the ratio 3:2:1), ``SPINDLE_WAIT`` (``0.5,2``: seconds between
a user's requests, uniform), ``SPINDLE_MAX_BACKOFF`` (10).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from typing import Any

from locust import HttpUser, between, task

TEXT = ("now is the winter of our discontent made glorious summer by this sun of york and all the clouds "
        "that lowered upon our house in the deep bosom of the ocean buried")
WORDS = TEXT.split(" ")
PROMPT_WEIGHTS = (3, 2, 1)


def env_floats(name: str, default: str) -> list[float]:
    return [float(x) for x in os.environ.get(name, default).split(",") if x.strip()]


MODEL = os.environ.get("SPINDLE_MODEL", "")
API_KEY = os.environ.get("SPINDLE_API_KEY", "")
MAX_TOKENS = int(os.environ.get("SPINDLE_MAX_TOKENS", "64"))
STREAM_SHARE = float(os.environ.get("SPINDLE_STREAM_SHARE", "0.5"))
PROMPT_WORDS = [int(n) for n in env_floats("SPINDLE_PROMPT_WORDS", "8,60,250")]
WAIT = env_floats("SPINDLE_WAIT", "0.5,2")
MAX_BACKOFF = float(os.environ.get("SPINDLE_MAX_BACKOFF", "10"))


def prompt(words: int, rng: random.Random) -> str:
    start = rng.randrange(len(WORDS))
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(words))


def error_code(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "no error object"


class ChatUser(HttpUser):
    wait_time = between(WAIT[0], WAIT[-1])

    def on_start(self) -> None:
        self.rng = random.Random()
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    def body(self, stream: bool) -> dict[str, Any]:
        words = self.rng.choices(PROMPT_WORDS, weights=PROMPT_WEIGHTS[:len(PROMPT_WORDS)])[0]
        out: dict[str, Any] = {"messages": [{"role": "user", "content": prompt(words, self.rng)}],
                               "max_tokens": MAX_TOKENS, "stream": stream}
        if stream:
            out["stream_options"] = {"include_usage": True}  # the token count for TPOT
        if MODEL:
            out["model"] = MODEL
        return out

    @task
    def chat(self) -> None:
        if self.rng.random() < STREAM_SHARE:
            self.chat_stream()
        else:
            self.chat_once()

    def chat_once(self) -> None:
        with self.client.post("/v1/chat/completions", json=self.body(False), name="chat",
                              catch_response=True) as resp:
            if resp.status_code != 200:
                self.refused(resp, resp.content)
            elif not resp.json().get("choices"):
                resp.failure("no choices in the answer")

    def chat_stream(self) -> None:
        name = "chat stream"
        start = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=self.body(True), name=name, stream=True,
                              catch_response=True) as resp:
            if resp.status_code != 200:
                self.refused(resp, resp.content)
                return
            first: float | None = None
            tokens, done, failure = 0, False, None
            for line in resp.iter_lines():
                if line == b"data: [DONE]":
                    done = True
                elif line.startswith(b"data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        failure = f"error event: {chunk['error'].get('code')}"
                    elif chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    elif first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                        first = time.perf_counter()
            end = time.perf_counter()
            resp.request_meta["response_time"] = (end - start) * 1000  # locust stopped at the headers
            if failure or not done:
                resp.failure(failure or "the stream ended without [DONE]")
                return
            if first is not None:
                self.record(f"TTFT {name}", (first - start) * 1000)
                if tokens > 1:
                    self.record(f"TPOT {name}", (end - first) * 1000 / (tokens - 1))

    def refused(self, resp: Any, body: bytes) -> None:
        resp.failure(f"{resp.status_code} {error_code(body)}")
        retry_after = resp.headers.get("Retry-After")
        if resp.status_code in (429, 503) and retry_after:
            with contextlib.suppress(ValueError):
                time.sleep(min(float(retry_after), MAX_BACKOFF))  # gevent patches time.sleep

    def record(self, name: str, ms: float) -> None:
        self.environment.events.request.fire(request_type="LLM", name=name, response_time=ms,
                                             response_length=0, exception=None, context={})
