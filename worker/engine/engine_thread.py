"""The engine loop on its own thread: steps while there is work, sleeps on a condition when idle.

Other threads (the worker's asyncio loop, via ``loop.call_soon_threadsafe`` on the way back) only
call ``add_request`` / ``cancel``; every step's outputs go to ``on_outputs`` on the engine thread,
which must be quick (hand them to a queue or to the event loop, do no I/O there).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from worker.engine.api import Engine, EngineOutput, EngineRequest, EngineStats

log = logging.getLogger(__name__)


class EngineThread:
    def __init__(self, engine: Engine, on_outputs: Callable[[list[EngineOutput]], None],
                 name: str = "engine", idle_wait: float = 0.5) -> None:
        self.engine = engine
        self.on_outputs = on_outputs
        self.idle_wait = idle_wait
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.last_error: BaseException | None = None

    def start(self) -> EngineThread:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def add_request(self, request: EngineRequest) -> None:
        self.engine.add_request(request)
        self._wake()

    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)
        self._wake()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self.engine.has_work():
                    self._cond.wait(self.idle_wait)
                if self._stop:
                    return
            try:
                outputs = self.engine.step()
            except Exception as exc:  # the engine fails requests itself; this is the last guard
                log.exception("engine step failed")
                self.last_error = exc
                time.sleep(0.05)
                continue
            if outputs:
                try:
                    self.on_outputs(outputs)
                except Exception:
                    log.exception("output callback failed")
