"""The worker's queue side: pull jobs from Redis, feed the engines, publish their tokens.

One ``ModelServer`` per served model owns an engine thread and reads that model's stream as a member
of the ``workers`` consumer group, asking for at most as many jobs as it has free slots (batching
starts in the queue). Every engine step's outputs are published in one round trip, one Lua script
(worker/fencing.py): one PUBLISH of an ``EventBatch`` per gateway, plus XACK+XDEL of the jobs that
finished (a finished job leaves the stream, so the stream's length is the work not yet done).

Every event is also appended to the request's event log (``spindle:progress:<id>``) in the same
script, so the log and what gateways received never disagree. The script writes only for jobs whose
stream entry is still pending under this worker's name (fencing): a worker cut off from Redis whose
jobs were taken over meanwhile writes nothing for them once it is back, and drops them.

The log is what makes a dead worker's job resumable: a worker that takes the job over (XAUTOCLAIM
after ``CLAIM_IDLE_MS``) reads the log, continues after the tokens already delivered, and numbers its
events from where the log ends; gateways drop any duplicate by ``seq``. A live worker renews the
lease on its running jobs with a JUSTID XCLAIM on every heartbeat, so only jobs of dead workers ever go
idle that long. A job delivered more than ``MAX_DELIVERIES`` times (it keeps killing workers) goes to
the dead-letter stream and its client gets an error.

Redis going away (a restart, a network cut) stops nothing for good: the consumer loop and the pub/sub
listeners retry with jittered exponential backoff capped at ``RETRY_CAP_S``, the reclaimer at its
period, the heartbeat with a backoff capped at its interval (never slower, or a healthy worker would
look dead); a command on a stale connection is re-sent on a fresh one (``create_redis``);
a consumer group lost with Redis's data is created again, and jobs lost with it are fenced off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError, ResponseError

from protocol import keys
from protocol.messages import CancelMessage, ControlMessage, Job, TokenEvent, WorkerInfo
from protocol.settings import WorkerSettings
from worker.engine.api import Engine, EngineOutput, EngineRequest
from worker.engine.engine_thread import EngineThread
from worker.fencing import Fence, Write
from worker.metrics import RequestObs, WorkerMetrics

log = logging.getLogger("worker")

CANCELLED_TTL_S = 600
# Longest pause (nominal seconds, jitter 0.5-1.5x) between tries of the consumer loop and the pub/sub
# listeners while Redis is away: about how long, at worst, a worker stays deaf after Redis is back.
# A try against a Redis that is down costs one refused connection.
RETRY_CAP_S = 1.0


@dataclass
class ActiveJob:
    job: Job
    entry_id: str
    deliveries: int = 1  # the entry's delivery count when we took it: our fencing token (worker/fencing.py)
    received_at: float = field(default_factory=time.time)
    seq: int = 0
    delivered: list[int] = field(default_factory=list)  # token ids already sent to the client
    obs: RequestObs | None = None  # its metrics and trace spans (worker.metrics)
    delivered_chars: int | None = None  # characters of text sent (set on a resumed job)


async def ensure_group(r: aioredis.Redis, stream: str) -> None:
    try:
        await r.xgroup_create(stream, keys.JOBS_GROUP, id="0", mkstream=True)
    except ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


class ModelServer:
    """One model on this worker: its engine thread, its stream, its jobs in flight."""

    def __init__(self, worker: Worker, model: str, engine: Engine, device: str = "cpu", dtype: str = "",
                 thread: EngineThread | None = None):
        """``thread``: the engine's thread when it was built there (``Worker.launch_model``); else one is made."""
        self.worker = worker
        self.model = model
        self.engine = engine
        self.device = device
        self.dtype = dtype
        self.stream = keys.jobs_stream(model)
        self.jobs: dict[str, ActiveJob] = {}
        self.capacity = asyncio.Event()
        self.consumer: asyncio.Task | None = None
        self.stopping = False
        self.last_used = time.monotonic()
        loop = asyncio.get_running_loop()

        def on_outputs(outs: list[EngineOutput]) -> None:
            loop.call_soon_threadsafe(worker.outputs.put_nowait, (self, outs))

        if thread is None:
            thread = EngineThread(worker.metrics.metered(engine, model), on_outputs, name=f"engine-{model}")
        thread.on_outputs = on_outputs
        self.thread = thread

    @property
    def free_slots(self) -> int:
        return max(0, self.worker.settings.max_batch - len(self.jobs))

    async def consume(self) -> None:
        """Pull jobs while we have free slots; block in XREADGROUP when idle. Never gives up on Redis."""
        w = self.worker
        backoff = Backoff(cap=RETRY_CAP_S)
        outage = Outage(f"reading {self.stream}")
        group_ready = False
        while not w.draining and not self.stopping:
            free = self.free_slots
            if free == 0:
                self.capacity.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.capacity.wait(), 0.5)
                continue
            try:
                if not group_ready:
                    await ensure_group(w.redis, self.stream)
                    group_ready = True
                resp = await w.redis.xreadgroup(keys.JOBS_GROUP, w.id, {self.stream: ">"}, count=free,
                                                block=1000)
            except RedisError as e:
                outage.failed(e)
                if isinstance(e, ResponseError) and "NOGROUP" in str(e) and group_ready:
                    group_ready = False  # stream deleted (FLUSHALL, Redis restarted without its data)
                    continue  # Redis answers: create the group again at once
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            outage.ok()
            for _stream, entries in resp or []:
                for entry_id, fields in entries:
                    await self.accept(entry_id, fields)

    async def accept(self, entry_id: bytes | str, fields: dict, recovered: bool = False, deliveries: int = 1) -> None:
        """Take one stream entry. ``recovered``: a claimed or handed-back job, resumed from its log;
        ``deliveries``: the entry's delivery count (1 when read from the stream, more when claimed).

        Redis failing half-way leaves the entry pending under our name without a lease renewal: it is
        taken over (maybe by us) once CLAIM_IDLE_MS has passed, and resumed from its event log.
        """
        entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        try:
            job = Job.from_fields(fields)
        except Exception as e:
            log.error("malformed job %s dropped to the dead-letter stream: %s", entry_id, e)
            with contextlib.suppress(RedisError):
                await self.dead_letter(entry_id, f"malformed: {e}", None)
            return
        stale = self.jobs.get(job.request_id)
        if stale is not None or self.thread.owns(job.request_id):
            # We claimed back a job we lost (a partition) before our old run of it was fenced off: that
            # run is stale. Stop it; this delivery waits (pending, unrenewed) for the next takeover,
            # as the engine cannot hold one request id twice.
            log.warning("job %s claimed again while an earlier run of it is still here; stopping that run",
                        job.request_id, extra={"request_id": job.request_id})
            if stale is not None:
                self.drop(stale)
            return
        active = ActiveJob(job, entry_id, deliveries)
        self.last_used = time.monotonic()
        try:
            await self._start(active, recovered)
        except RedisError as e:
            log.warning("taking job %s failed (%s); left for takeover", job.request_id, e,
                        extra={"request_id": job.request_id})
            self.drop(active)

    async def _start(self, active: ActiveJob, recovered: bool) -> None:
        """Resume ``active`` from its event log if it has one, then run it (or end it at once)."""
        w, job, entry_id = self.worker, active.job, active.entry_id
        if recovered or job.resume_token_ids:
            events = [TokenEvent.model_validate_json(e)
                      for e in await w.redis.lrange(keys.progress_key(job.request_id), 0, -1)]
            if any(e.finish_reason for e in events):  # finished, but the ack was lost with its worker
                await self.ack(entry_id)
                return
            active.seq = len(events)
            active.delivered = [t for e in events for t in e.token_ids]
            active.delivered_chars = sum(len(e.text) for e in events)
            job.resume_token_ids = active.delivered
            if events:
                w.takeovers += 1
                log.info("resuming %s after %d delivered tokens", job.request_id, len(active.delivered),
                         extra={"request_id": job.request_id})
        active.obs = w.metrics.track(job, self.model, recovered or bool(job.resume_token_ids))
        self.jobs[job.request_id] = active
        if job.deadline is not None and time.time() > job.deadline:
            await self.finish_early(active, "timeout", "the request's deadline passed before a worker ran it")
            return
        if await w.redis.exists(keys.cancelled_key(job.request_id)):
            await self.finish_early(active, "cancelled", None)
            return
        self.thread.add_request(EngineRequest(job.request_id, job.prompt_token_ids, job.params,
                                              resume_token_ids=list(job.resume_token_ids),
                                              resume_text_len=active.delivered_chars))

    async def dead_letter(self, entry_id: str, reason: str, job: Job | None, deliveries: int = 1) -> None:
        w = self.worker
        fields = {"stream": self.stream, "entry_id": entry_id, "reason": reason[:500], "worker_id": w.id}
        if job is not None:
            fields["job"] = job.model_dump_json()
        await w.redis.xadd(keys.DEADLETTER_STREAM, fields, maxlen=10_000, approximate=True)
        w.dead_letters += 1
        if job is not None:
            active = ActiveJob(job, entry_id, deliveries)
            self.jobs[job.request_id] = active
            await self.finish_early(active, "error", f"job failed on {w.settings.max_deliveries} workers; "
                                    "moved to the dead-letter stream")
        else:
            await self.ack(entry_id)

    async def reclaim(self) -> None:
        """Take over jobs whose worker stopped renewing their lease (it died)."""
        w = self.worker
        free = self.free_slots
        if free == 0 or w.draining:
            return
        resp = await w.redis.xautoclaim(self.stream, keys.JOBS_GROUP, w.id, w.settings.claim_idle_ms,
                                        start_id="0-0", count=free)
        claimed = resp[1] if resp else []
        for entry_id, fields in claimed:
            if not fields:  # deleted meanwhile
                continue
            eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            info = await w.redis.xpending_range(self.stream, keys.JOBS_GROUP, min=eid, max=eid, count=1)
            deliveries = info[0]["times_delivered"] if info else 1
            if deliveries > w.settings.max_deliveries:
                try:
                    job = Job.from_fields(fields)
                except Exception:
                    job = None
                log.error("job %s delivered %d times; dead-lettered", eid, deliveries)
                await self.dead_letter(eid, f"delivered {deliveries} times", job, deliveries)
                continue
            await self.accept(eid, fields, recovered=True, deliveries=deliveries)

    async def renew_leases(self) -> None:
        """Reset the idle time of our running jobs so no other worker claims them (no delivery count).

        Only jobs still pending under our name are renewed, checked and claimed in one script (a
        check, then a claim, could take back a job another worker claimed in between): a job another
        worker took over while we could not reach Redis (a partition) is dropped here.
        """
        if not self.jobs:
            return
        lost = await self.worker.fence.renew(self.stream, [(a.entry_id, a.deliveries) for a in self.jobs.values()])
        for active in [a for a in self.jobs.values() if a.entry_id in lost]:
            log.warning("job %s was taken over by another worker; dropping it here", active.job.request_id,
                        extra={"request_id": active.job.request_id})
            self.drop(active)

    def drop(self, active: ActiveJob) -> None:
        """Forget a job without finishing it: it stays pending in the stream, where its lease runs out
        and a worker (maybe this one) resumes it from its event log."""
        if self.jobs.get(active.job.request_id) is active:
            del self.jobs[active.job.request_id]
            self.thread.cancel(active.job.request_id)
            self.capacity.set()

    async def hand_back(self) -> int:
        """Put unfinished jobs back in the stream (with what was delivered) for another worker."""
        left = list(self.jobs.values())
        for active in left:
            self.jobs.pop(active.job.request_id, None)
            self.thread.cancel(active.job.request_id)
            if active.obs is not None:
                active.obs.abandoned("handed_back")
        if not left:
            return 0
        # Only jobs still ours: one another worker took over meanwhile must not be queued twice.
        lost = await self.worker.fence.hand_back(self.stream, [
            (a.entry_id, a.deliveries, a.job.model_copy(update={"resume_token_ids": a.delivered}).to_fields())
            for a in left])
        if lost:
            log.warning("%d jobs were taken over by another worker before the hand-back", len(lost))
        return len(left) - len(lost)

    async def finish_early(self, active: ActiveJob, reason: str, error: str | None) -> None:
        out = EngineOutput(active.job.request_id, [], "", reason,  # type: ignore[arg-type]
                           num_prompt_tokens=len(active.job.prompt_token_ids), error=error)
        try:
            await self.worker.publish(self, [out])
        except RedisError:
            self.drop(active)  # still pending: taken over and ended by whoever claims it
            raise

    async def ack(self, entry_id: str) -> None:
        async with self.worker.redis.pipeline(transaction=False) as p:
            p.xack(self.stream, keys.JOBS_GROUP, entry_id)
            p.xdel(self.stream, entry_id)
            await p.execute()


class Backoff:
    """Capped exponential backoff with jitter (each delay 0.5-1.5 times the nominal one), so that many
    workers retrying against a Redis that is coming back do not retry in step."""

    def __init__(self, first: float = 0.1, cap: float = 5.0):
        self.first, self.cap, self.cur = first, cap, first

    def next(self) -> float:
        d, self.cur = self.cur, min(self.cap, self.cur * 2)
        return d * random.uniform(0.5, 1.5)

    def reset(self) -> None:
        self.cur = self.first


class Outage:
    """Logs a Redis outage seen by one loop once when it starts and once when it ends, not every retry."""

    def __init__(self, what: str):
        self.what = what
        self.since: float | None = None

    def failed(self, e: Exception) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log.warning("%s failed (%s: %s); retrying", self.what, type(e).__name__, e)

    def ok(self) -> None:
        if self.since is not None:
            log.info("%s works again after %.1fs", self.what, time.monotonic() - self.since)
            self.since = None


def create_redis(url: str) -> aioredis.Redis:
    """The worker's client. A command that fails on a broken connection (Redis restarted: every pooled
    connection is stale) is re-sent at once on a new one, a couple of times; safe because every write
    that matters is idempotent (the fence's scripts, SET, XCLAIM JUSTID). No socket timeout: XREADGROUP
    and pub/sub block on purpose; connecting is bounded."""
    return aioredis.Redis.from_url(url, health_check_interval=10, socket_connect_timeout=2,
                                   retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 2))


#: loads a model by name: (engine, device, dtype); blocking, run in a thread
EngineLoader = Callable[[str], tuple[Engine, str, str]]


class Worker:
    def __init__(self, settings: WorkerSettings, redis_client: aioredis.Redis | None = None,
                 loader: EngineLoader | None = None):
        self.settings = settings
        self.loader = loader
        self.id = settings.worker_id
        self.redis = redis_client or create_redis(settings.redis_url)
        self.servers: dict[str, ModelServer] = {}
        self.outputs: asyncio.Queue[tuple[ModelServer, list[EngineOutput]]] = asyncio.Queue()
        self.draining = False
        self.fence = Fence(self.redis, self.id, int(settings.progress_ttl * 1000))
        self._tasks: list[asyncio.Task] = []
        self.started_at = time.time()
        self.takeovers = 0
        self.fenced = 0  # jobs whose writes the fence refused (worker/fencing.py)
        self.dead_letters = 0
        self._control_tasks: set[asyncio.Task] = set()
        self.metrics = WorkerMetrics(self)

    def add_model(self, model: str, engine: Engine, device: str = "cpu", dtype: str = "",
                  thread: EngineThread | None = None) -> ModelServer:
        server = ModelServer(self, model, engine, device, dtype, thread)
        if not server.thread.alive:
            server.thread.start()
        self.servers[model] = server
        if self._tasks:  # already running: start consuming right away
            server.consumer = asyncio.create_task(server.consume(), name=f"consume-{model}")
        return server

    async def launch_model(self, model: str) -> ModelServer:
        """Load ``model`` on the thread that will run its engine (one OpenMP team: engine_thread.py)
        and serve it; raises what the loader raised."""
        assert self.loader is not None
        loader = self.loader
        built: dict[str, Any] = {}

        def build() -> Engine:
            engine, built["device"], built["dtype"] = loader(model)
            built["engine"] = engine
            return self.metrics.metered(engine, model)

        thread = EngineThread.launch(build, name=f"engine-{model}")
        await asyncio.to_thread(thread.wait_ready)
        return self.add_model(model, built["engine"], built["device"], built["dtype"], thread)

    async def load_model(self, model: str) -> bool:
        """Load ``model`` (in a thread) and start serving it; False when declined."""
        if model in self.servers or self.draining:
            return False
        if self.loader is None or len(self.servers) >= self.settings.max_models:
            log.info("declining to load %s (%d/%d models)", model, len(self.servers), self.settings.max_models)
            return False
        await self.launch_model(model)
        await self.heartbeat_once()
        log.info("loaded %s", model, extra={"model": model})
        return True

    async def unload_model(self, model: str) -> bool:
        """Stop taking ``model``'s jobs, let in-flight ones finish (DRAIN_TIMEOUT), hand back the rest."""
        server = self.servers.get(model)
        if server is None:
            return False
        server.stopping = True
        if server.consumer:
            server.consumer.cancel()
        deadline = time.monotonic() + self.settings.drain_timeout
        while server.jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await server.hand_back()
        server.thread.stop()
        del self.servers[model]
        await self.heartbeat_once()
        log.info("unloaded %s", model, extra={"model": model})
        return True

    async def with_redis_retry(self, fn, attempts: int = 50):
        backoff = Backoff()
        for i in range(attempts):
            try:
                return await fn(self.redis)
            except RedisError as e:
                if i == attempts - 1:
                    raise
                log.warning("redis unavailable (%s); retrying", e)
                await asyncio.sleep(backoff.next())

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.with_redis_retry(lambda r: r.ping())
        if self.settings.worker_metrics_port > 0:
            self.metrics.serve(self.settings.worker_metrics_host, self.settings.worker_metrics_port)
        self._tasks = [asyncio.create_task(self._publisher(), name="publisher"),
                       asyncio.create_task(self._heartbeat(), name="heartbeat"),
                       asyncio.create_task(self._cancel_listener(), name="cancel-listener"),
                       asyncio.create_task(self._reclaimer(), name="reclaimer"),
                       asyncio.create_task(self._control_listener(), name="control-listener")]
        for s in self.servers.values():
            s.consumer = asyncio.create_task(s.consume(), name=f"consume-{s.model}")
        await self.heartbeat_once()
        log.info("worker %s serving %s", self.id, ", ".join(self.servers), extra={"worker_id": self.id})

    async def drain(self, timeout: float) -> int:
        """Stop taking jobs; wait up to ``timeout`` for in-flight ones. Returns how many are left."""
        self.draining = True
        await self.heartbeat_once()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(s.jobs for s in self.servers.values()):
            await asyncio.sleep(0.05)
        return sum(len(s.jobs) for s in self.servers.values())

    async def stop(self) -> None:
        self.draining = True
        tasks = [*self._tasks, *self._control_tasks, *(s.consumer for s in self.servers.values() if s.consumer)]
        for t in tasks:
            t.cancel()
        # Bounded: a task stuck in a Redis call must not hold up the shutdown.
        await asyncio.wait(tasks, timeout=5) if tasks else None
        for s in self.servers.values():
            s.thread.stop()
        await asyncio.to_thread(self.metrics.close)  # joins the HTTP server's thread
        with contextlib.suppress(RedisError):
            await self.redis.delete(keys.worker_key(self.id))
        await self.redis.aclose()

    # -- tasks -------------------------------------------------------------------------------------
    async def _publisher(self) -> None:
        while True:
            server, outs = await self.outputs.get()
            try:
                await self.publish(server, outs)
            except RedisError as e:
                # This step may or may not have reached Redis (one script: all of it or nothing).
                # Its jobs' sequence numbers may have run ahead of their event logs, so they are
                # dropped here and resumed from the logs once their leases run out; their clients
                # see no gap and no duplicate.
                dropped = {o.request_id for o in outs}
                log.error("publishing %d outputs failed (%s); %d jobs left for takeover", len(outs), e,
                          len(dropped))
                for rid in dropped:
                    if (active := server.jobs.get(rid)) is not None:
                        server.drop(active)

    async def publish(self, server: ModelServer, outs: list[EngineOutput]) -> None:
        """One round trip (worker/fencing.py): for the jobs still ours, events appended to their logs
        and sent in one PUBLISH per gateway, finished jobs acked and deleted. The others are dropped."""
        writes: list[Write] = []
        observed: list[tuple[ActiveJob, EngineOutput]] = []
        for o in outs:
            active = server.jobs.get(o.request_id)
            if active is None:
                continue
            observed.append((active, o))
            job = active.job
            ev = TokenEvent(request_id=job.request_id, seq=active.seq, token_ids=o.new_token_ids,
                            text=o.new_text, finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                            error=o.error,
                            prompt_tokens=o.num_prompt_tokens or len(job.prompt_token_ids),
                            completion_tokens=o.num_generated_tokens, logprobs=o.logprobs,
                            worker_id=self.id)
            if active.seq == 0:
                ev.queue_time = max(0.0, active.received_at - job.created_at)
            writes.append(Write(active.entry_id, active.deliveries, job.request_id, active.seq, job.gateway_id,
                                o.finish_reason is not None, ev.model_dump_json(exclude_defaults=True)))
            active.seq += 1
            active.delivered.extend(o.new_token_ids)
        sent_at = time.time()
        fenced = await self.fence.publish(server.stream, writes)
        self.metrics.published([(a, o) for a, o in observed if a.entry_id not in fenced], sent_at)
        for active, o in observed:
            if active.entry_id in fenced:
                why = fenced[active.entry_id]
                log.warning("job %s fenced off (%s): another worker owns it now, or its log lost events; "
                            "dropping it here", active.job.request_id, why,
                            extra={"request_id": active.job.request_id})
                self.fenced += 1
                server.drop(active)
            elif o.finish_reason is not None and server.jobs.get(active.job.request_id) is active:
                del server.jobs[active.job.request_id]
                server.capacity.set()

    def info(self) -> WorkerInfo:
        running = waiting = 0
        kv = 0.0
        for s in self.servers.values():
            st = s.thread.stats()
            running += st.running
            waiting += st.waiting
            kv = max(kv, st.kv_usage)
        first = next(iter(self.servers.values()), None)
        return WorkerInfo(worker_id=self.id, models=list(self.servers), device=first.device if first else "",
                          dtype=first.dtype if first else "", engine=self.settings.engine,
                          max_batch=self.settings.max_batch, running=running, waiting=waiting,
                          kv_usage=kv, started_at=self.started_at, draining=self.draining,
                          metrics_port=self.settings.worker_metrics_port)

    async def heartbeat_once(self) -> None:
        ttl_ms = int(self.settings.heartbeat_ttl * 1000)
        async with self.redis.pipeline(transaction=False) as p:
            p.set(keys.worker_key(self.id), self.info().model_dump_json(), px=ttl_ms)
            await p.execute()
        for s in list(self.servers.values()):
            await s.renew_leases()

    async def _unload_idle(self) -> None:
        limit = self.settings.model_idle_unload
        if limit <= 0 or len(self.servers) < 2:
            return
        now = time.monotonic()
        for s in list(self.servers.values()):
            if len(self.servers) > 1 and not s.jobs and now - s.last_used > limit:
                log.info("unloading %s after %.0fs idle", s.model, now - s.last_used)
                await self.unload_model(s.model)

    async def _reclaimer(self) -> None:
        period = max(0.2, self.settings.claim_idle_ms / 1000 / 3)
        outage = Outage("reclaiming idle jobs")
        while True:
            await asyncio.sleep(period)
            try:
                for s in list(self.servers.values()):
                    await s.reclaim()
                outage.ok()
            except RedisError as e:  # NOGROUP too, until the consumer loop has created the group again
                outage.failed(e)

    async def hand_back(self) -> int:
        n = 0
        for s in self.servers.values():
            n += await s.hand_back()
        return n

    async def _heartbeat(self) -> None:
        """Every HEARTBEAT_INTERVAL; while Redis is away, sooner (backoff up to the interval), so the
        worker is listed again, and its leases renewed, right after Redis is back."""
        outage = Outage("heartbeat")
        backoff = Backoff(cap=self.settings.heartbeat_interval)
        while True:
            pause = self.settings.heartbeat_interval
            try:
                await self.heartbeat_once()
                outage.ok()
                backoff.reset()
            except RedisError as e:
                outage.failed(e)
                pause = min(pause, backoff.next())
            await self._unload_idle()
            await asyncio.sleep(pause)

    async def _subscribe(self, channel: str, handle: Callable[[bytes], object]) -> None:
        """Listen on ``channel`` for ever, resubscribing with backoff when Redis drops."""
        backoff = Backoff(cap=RETRY_CAP_S)
        outage = Outage(f"subscription to {channel}")
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                backoff.reset()
                outage.ok()
                async for msg in pubsub.listen():
                    if msg.get("type") == "message":
                        result = handle(msg["data"])
                        if asyncio.iscoroutine(result):
                            await result
            except RedisError as e:
                outage.failed(e)
                await asyncio.sleep(backoff.next())
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), 2)

    async def _cancel_listener(self) -> None:
        def handle(data: bytes) -> None:
            try:
                self.cancel(CancelMessage.model_validate_json(data).request_ids)
            except ValueError:
                log.warning("ignoring malformed cancel message")

        await self._subscribe(keys.CANCEL_CHANNEL, handle)

    async def _control_listener(self) -> None:
        async def handle(data: bytes) -> None:
            try:
                msg = ControlMessage.decode(data)
            except ValueError:
                log.warning("ignoring malformed control message")
                return
            if msg.worker_id not in (None, self.id):
                return
            try:
                if msg.action == "load":
                    await self.load_model(msg.model)
                elif msg.action == "unload":
                    await self.unload_model(msg.model)
            except Exception:
                log.exception("control %s %s failed", msg.action, msg.model, extra={"model": msg.model})

        def spawn(data: bytes) -> None:  # loading takes seconds: do not hold up the subscription
            task = asyncio.create_task(handle(data))
            self._control_tasks.add(task)
            task.add_done_callback(self._control_tasks.discard)

        await self._subscribe(keys.CONTROL_CHANNEL, spawn)

    def cancel(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            for s in self.servers.values():
                if rid in s.jobs:
                    s.thread.cancel(rid)
