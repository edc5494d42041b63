"""Runs an engine on its own thread; the asyncio side only moves requests in and outputs out.

Requests and cancellations are queued and applied on the engine thread between two steps, so an
engine never sees two threads. The thread sleeps on a condition while there is nothing to do.
Outputs of each step go to ``on_outputs`` (called on the engine thread: it must only hand them over,
e.g. with ``loop.call_soon_threadsafe``).

Build the engine on this thread too (``EngineThread.launch(build, ...)``, then ``wait_ready()``):
each thread that runs parallel torch ops gets its own OpenMP team, and once a second team exists
(the model loaded and its weights packed on another thread) libgomp sees more threads than cores
and stops spinning between parallel regions: a batch-1 decode step took 64 ms instead of 32 ms, and
the benchmark's mixed workload ran 2x slower. One thread does all of a model's torch work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from worker.engine.api import Engine, EngineOutput, EngineRequest, EngineStats

log = logging.getLogger(__name__)


class EngineThread:
    def __init__(self, engine: Engine | None, on_outputs: Callable[[list[EngineOutput]], None], name: str = "engine",
                 build: Callable[[], Engine] | None = None):
        if (engine is None) == (build is None):
            raise ValueError("give an engine or a build function, not both")
        self.engine: Engine = engine  # type: ignore[assignment]  (set on the thread when built)
        self._build = build
        self._ready = threading.Event()
        self._build_error: BaseException | None = None
        self.on_outputs = on_outputs
        self._cond = threading.Condition()
        self._adds: list[EngineRequest] = []
        self._cancels: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stats = EngineStats()
        self._owned: set[str] = set()  # requests added and not yet finished

    @classmethod
    def launch(cls, build: Callable[[], Engine], on_outputs: Callable[[list[EngineOutput]], None] = lambda _: None,
               name: str = "engine") -> EngineThread:
        """Start a thread that first builds its engine with ``build`` (see the module's docstring)."""
        return cls(None, on_outputs, name, build=build).start()

    # -- called from any thread -------------------------------------------------------------------
    def start(self) -> EngineThread:
        self._thread.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> Engine:
        """The engine once built (at once when it was given); re-raises what ``build`` raised."""
        if not self._ready.wait(timeout):
            raise TimeoutError(f"engine not built within {timeout}s")
        if self._build_error is not None:
            raise self._build_error
        return self.engine

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def add_request(self, request: EngineRequest) -> None:
        with self._cond:
            self._owned.add(request.request_id)
            self._adds.append(request)
            self._cond.notify()

    def cancel(self, request_id: str) -> None:
        with self._cond:
            if request_id in self._owned:
                self._cancels.append(request_id)
                self._cond.notify()

    def owns(self, request_id: str) -> bool:
        with self._cond:
            return request_id in self._owned

    @property
    def load(self) -> int:
        """Requests this engine holds (queued, waiting or running)."""
        with self._cond:
            return len(self._owned)

    def stats(self) -> EngineStats:
        return self._stats

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        if self._build is not None:
            try:
                self.engine = self._build()
            except BaseException as e:  # handed to wait_ready()
                self._build_error = e
        self._ready.set()
        if self._build_error is not None:
            return
        engine = self.engine
        while True:
            with self._cond:
                while not self._stop and not self._adds and not self._cancels and not engine.has_work():
                    self._cond.wait()
                if self._stop:
                    return
                adds, self._adds = self._adds, []
                cancels, self._cancels = self._cancels, []
            outputs: list[EngineOutput] = []
            for req in adds:
                try:
                    engine.add_request(req)
                except Exception as e:  # a request the engine refuses fails alone
                    log.exception("engine refused request %s", req.request_id)
                    outputs.append(EngineOutput(req.request_id, [], "", "error", error=str(e)))
            for rid in cancels:
                engine.cancel(rid)
            if engine.has_work():
                try:
                    outputs.extend(engine.step())
                except Exception as e:
                    log.exception("engine step failed; failing its requests")
                    outputs.extend(self._fail_all(str(e)))
            self._stats = engine.stats()
            if outputs:
                finished = {o.request_id for o in outputs if o.finish_reason is not None}
                if finished:
                    with self._cond:
                        self._owned -= finished
                try:
                    self.on_outputs(outputs)
                except Exception:
                    log.exception("output callback failed")
            elif not adds and not cancels:
                time.sleep(0.001)  # has_work but produced nothing: do not spin hot

    def _fail_all(self, error: str) -> list[EngineOutput]:
        with self._cond:
            owned = list(self._owned)
        for rid in owned:
            try:
                self.engine.cancel(rid)
            except Exception:
                log.exception("cancel after failure")
        # drain the cancellation outputs the engine produces, then report errors
        try:
            self.engine.step()
        except Exception:
            log.exception("step after failure")
        return [EngineOutput(rid, [], "", "error", error=f"engine error: {error}") for rid in owned]
