"""``python -m model_manager.jobs_worker``: the rq worker that runs pull / import / optimize jobs.

An rq ``SimpleWorker`` (jobs run in this process, one at a time, so torch and transformers are imported
once) on the ``keys.MODEL_JOBS_QUEUE`` queue of REDIS_URL. SIGTERM finishes the current job first
(rq's warm shutdown; a second SIGTERM stops at once, and a pull interrupted that way resumes on the
next pull of the same name). Redis being down at start or later is retried with backoff.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import redis
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from model_manager import jobs
from protocol.logs import setup_logging
from protocol.settings import ManagerSettings

log = logging.getLogger("model_manager.jobs_worker")


def main() -> int:
    settings = ManagerSettings()
    setup_logging("manager-jobs", settings.log_level, settings.log_format)
    settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    backoff = 0.5
    while True:
        conn = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, health_check_interval=30)
        try:
            conn.ping()
            worker = SimpleWorker([jobs.queue(conn)], connection=conn, serializer=JSONSerializer,
                                  name=f"manager-jobs-{socket.gethostname()}-{os.getpid()}-{int(time.time())}")
            log.info("jobs worker %s on queue %s", worker.name, jobs.queue(conn).name)
            worker.work(with_scheduler=False, logging_level=settings.log_level.upper())
            return 0
        except redis.ConnectionError as e:
            log.warning("redis unavailable (%s); retrying in %.1fs", e, backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, 10.0)


if __name__ == "__main__":
    sys.exit(main())
