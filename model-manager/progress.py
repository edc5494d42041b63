"""Progress reporting from inside an rq job.

The job's code calls :meth:`Progress.update` / :meth:`Progress.add_bytes` as often as it likes (per
downloaded chunk); a background thread writes the record into the job's ``meta["progress"]`` at most
every ``interval`` seconds, and at least every ``heartbeat`` seconds so the API can tell a running
job from one whose worker died. It also adds the bytes downloaded since the last write to the
``download_bytes`` counter in ``keys.MANAGER_STATS_KEY``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from rq.job import Job

from protocol import keys

log = logging.getLogger(__name__)


class Progress:
    def __init__(self, job: Job | None, interval: float = 0.5, heartbeat: float = 2.0):
        self.job = job
        self.interval = interval
        self.heartbeat = heartbeat
        self.state: dict[str, Any] = {"stage": "queued", "bytes_done": 0, "bytes_total": 0, "files_done": 0,
                                      "files_total": 0, "current_file": "", "message": "", "error": None}
        self._lock = threading.Lock()
        self._dirty = True
        self._network_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        self.update(stage="starting", message="")
        self.flush()
        if self.job is not None:
            self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.flush()

    def update(self, **fields: Any) -> None:
        with self._lock:
            self.state.update(fields)
            self._dirty = True

    def add_bytes(self, n: int) -> None:
        """``n`` bytes arrived from the network (counted in bytes_done and the download counter)."""
        with self._lock:
            self.state["bytes_done"] += n
            self._network_bytes += n
            self._dirty = True

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.state)

    def flush(self) -> None:
        if self.job is None:
            return
        with self._lock:
            record = {**self.state, "updated_at": time.time()}
            sent, self._network_bytes = self._network_bytes, 0
            self._dirty = False
        try:
            self.job.meta["progress"] = record
            self.job.save_meta()
            if sent:
                self.job.connection.hincrby(keys.MANAGER_STATS_KEY, "download_bytes", sent)
        except Exception as e:  # a Redis hiccup must not kill the download; the next flush retries
            log.warning("could not save job progress: %s", e)
            with self._lock:
                self._network_bytes += sent
                self._dirty = True

    def _run(self) -> None:
        last = 0.0
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if self._dirty or now - last >= self.heartbeat:
                self.flush()
                last = now
