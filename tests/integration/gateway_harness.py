"""For the gateway's integration tests: the real app on a real uvicorn server on a loopback port, and a
``FakeWorker`` that plays the worker's half of the protocol (XREADGROUP the job, PUBLISH events)
with a plain redis client, so each test controls exactly what the gateway receives.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis
import uvicorn
from redis.exceptions import ResponseError

from gateway.app import create_app
from launcher.redis_server import free_port
from protocol import keys
from protocol.messages import EventBatch, Job, TokenEvent, WorkerInfo
from protocol.settings import GatewaySettings

MODEL = "tiny-llama"


@dataclass
class RunningGateway:
    url: str
    settings: GatewaySettings
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def gateway_id(self) -> str:
        return self.settings.gateway_id

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def gateway_settings(redis_url: str, artifacts: Path, tmp: Path, **overrides) -> GatewaySettings:
    values = dict(redis_url=redis_url, artifacts_dir=artifacts, bundled_models_dir=tmp / "no-bundled",
                  default_model=MODEL, gateway_id=f"gw-test-{uuid.uuid4().hex[:8]}", request_timeout=30.0,
                  event_timeout=10.0, log_format="text")
    values.update(overrides)
    return GatewaySettings(**values)


def start_gateway(settings: GatewaySettings, timeout: float = 20.0) -> RunningGateway:
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning",
                            lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="gateway-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start")
        time.sleep(0.02)
    return RunningGateway(f"http://127.0.0.1:{port}", settings, server, thread)


@contextmanager
def running_gateway(settings: GatewaySettings) -> Iterator[RunningGateway]:
    gw = start_gateway(settings)
    try:
        yield gw
    finally:
        gw.stop()


class FakeWorker:
    """The worker's side of the protocol, driven by the test."""

    def __init__(self, redis_url: str, models: list[str] | None = None, worker_id: str = "fake-worker"):
        self.r = redis.Redis.from_url(redis_url)
        self.models = models or [MODEL]
        self.worker_id = worker_id

    def heartbeat(self, ttl: int = 30, draining: bool = False) -> None:
        info = WorkerInfo(worker_id=self.worker_id, models=self.models, device="cpu", dtype="float32",
                          engine="fake", max_batch=8, draining=draining)
        self.r.set(keys.worker_key(self.worker_id), info.model_dump_json(), ex=ttl)

    def stop_heartbeat(self) -> None:
        self.r.delete(keys.worker_key(self.worker_id))

    def ensure_group(self, model: str = MODEL) -> None:
        try:
            self.r.xgroup_create(keys.jobs_stream(model), keys.JOBS_GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def take_job(self, model: str = MODEL, timeout: float = 10.0) -> tuple[str, Job]:
        self.ensure_group(model)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            resp = self.r.xreadgroup(keys.JOBS_GROUP, self.worker_id, {keys.jobs_stream(model): ">"}, count=1,
                                     block=200)
            for _stream, entries in resp or []:
                for entry_id, fields in entries:
                    return entry_id.decode(), Job.from_fields(fields)
        raise TimeoutError(f"no job for {model} within {timeout}s")

    def finish(self, job: Job, entry_id: str) -> None:
        self.r.xack(keys.jobs_stream(job.model), keys.JOBS_GROUP, entry_id)
        self.r.xdel(keys.jobs_stream(job.model), entry_id)

    def publish(self, gateway_id: str, events: list[TokenEvent]) -> None:
        self.r.publish(keys.events_channel(gateway_id), EventBatch(events=events).encode())

    def events_for(self, job: Job, pieces: list[str], finish: str = "stop", **final) -> list[TokenEvent]:
        """One event per text piece (token id = index + 1), the last one carrying ``finish``."""
        out = []
        for i, text in enumerate(pieces):
            last = i == len(pieces) - 1
            out.append(TokenEvent(request_id=job.request_id, seq=i, token_ids=[i + 1], text=text,
                                  prompt_tokens=len(job.prompt_token_ids), completion_tokens=i + 1,
                                  worker_id=self.worker_id, finish_reason=finish if last else None,
                                  queue_time=0.01 if i == 0 else None, **(final if last else {})))
        return out

    def reply(self, job: Job, pieces: list[str], finish: str = "stop", **final) -> None:
        for ev in self.events_for(job, pieces, finish, **final):
            self.publish(job.gateway_id, [ev])

    def cancelled(self, request_id: str) -> bool:
        return bool(self.r.exists(keys.cancelled_key(request_id)))

    def queued(self, model: str = MODEL) -> int:
        return int(self.r.xlen(keys.jobs_stream(model))) if self.r.exists(keys.jobs_stream(model)) else 0


class AutoResponder:
    """A background thread answering every job of ``model`` with ``script(job)`` -> text pieces."""

    def __init__(self, worker: FakeWorker, script: Callable[[Job], list[str]], model: str = MODEL):
        self.worker = worker
        self.script = script
        self.model = model
        self.jobs: list[Job] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="auto-responder", daemon=True)

    def __enter__(self) -> AutoResponder:
        self.worker.ensure_group(self.model)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                entry_id, job = self.worker.take_job(self.model, timeout=0.5)
            except TimeoutError:
                continue
            self.jobs.append(job)
            pieces = self.script(job)
            finish = "length" if len(pieces) >= job.params.max_tokens else "stop"
            self.worker.reply(job, pieces, finish)
            self.worker.finish(job, entry_id)


class CancelListener:
    """Collects ``CancelMessage`` request ids published on the cancel channel."""

    def __init__(self, redis_url: str):
        self.r = redis.Redis.from_url(redis_url)
        self.pubsub = self.r.pubsub()
        self.pubsub.subscribe(keys.CANCEL_CHANNEL)
        self.pubsub.get_message(timeout=2)  # the subscribe confirmation
        self.ids: list[str] = []

    def wait_for(self, request_id: str, timeout: float = 10.0) -> bool:
        import json

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if request_id in self.ids:
                return True
            msg = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if msg and msg["type"] == "message":
                self.ids.extend(json.loads(msg["data"])["request_ids"])
        return request_id in self.ids

    def close(self) -> None:
        self.pubsub.close()
        self.r.close()
