"""``python -m worker.healthcheck``: exit 0 when this container's worker is heartbeating in Redis.

A worker has no HTTP server, so Docker (and Kubernetes' exec probes) ask Redis instead: a worker
that is alive renews its key ``spindle:worker:<worker_id>`` every HEARTBEAT_INTERVAL with a TTL of
HEARTBEAT_TTL, so the key exists exactly while the worker is alive (a draining worker keeps
heartbeating, and counts as alive).

Which key: WORKER_ID when it is set (then it must be unique per container: do not set it in a
compose file that is scaled with ``--scale worker=N``). Otherwise the worker made up its own id,
``wk-<hostname>-<pid>-<random>`` (``protocol.settings``); the hostname is unique per container, so
any key with the prefix ``wk-<hostname>-`` is this container's worker (found with SCAN, which
stops at the first match and walks a keyspace of short-lived keys). Exit codes: 0 healthy,
1 unhealthy (no heartbeat, or Redis unreachable), as Docker's HEALTHCHECK expects.
"""

from __future__ import annotations

import os
import re
import socket
import sys

import redis

from protocol import keys
from protocol.settings import WorkerSettings

TIMEOUT_S = 3.0


def default_id_prefix(hostname: str | None = None) -> str:
    """The prefix of the id a worker gives itself when WORKER_ID is not set."""
    return f"wk-{hostname or socket.gethostname()}-"


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def find_heartbeat(client: redis.Redis, worker_id: str | None, hostname: str | None = None) -> str | None:
    """The heartbeat key of this container's worker, or None when there is none."""
    if worker_id:
        key = keys.worker_key(worker_id)
        return key if client.exists(key) else None
    pattern = keys.worker_key(_glob_escape(default_id_prefix(hostname)) + "*")
    for key in client.scan_iter(match=pattern, count=1000):
        return key.decode() if isinstance(key, bytes) else key
    return None


def check(redis_url: str, worker_id: str | None, hostname: str | None = None) -> tuple[bool, str]:
    client = redis.Redis.from_url(redis_url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
    try:
        key = find_heartbeat(client, worker_id, hostname)
    except redis.RedisError as e:
        return False, f"redis unreachable at {redis_url}: {e}"
    finally:
        client.close()
    if key is None:
        wanted = worker_id or default_id_prefix(hostname) + "*"
        return False, f"no heartbeat for worker {wanted} (still loading its model, or dead)"
    return True, f"alive: {key}"


def main() -> int:
    # Only WORKER_ID as the user set it counts: WorkerSettings() would invent a fresh random id.
    worker_id = os.environ.get("WORKER_ID", "").strip() or None
    healthy, message = check(WorkerSettings().redis_url, worker_id)
    print(message, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
