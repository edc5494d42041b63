"""Every Redis key and channel name spindle uses, written once.

Jobs:      stream  ``spindle:jobs:<model>``, consumer group ``workers`` (at-least-once, XAUTOCLAIM)
Ownership: no key of its own: a job belongs to the consumer (worker id) its entry is pending under;
           workers write for a job only while that holds (worker/fencing.py)
Tokens:    channel ``spindle:events:<gateway_id>`` (one per gateway instance, not per request)
Cancel:    channel ``spindle:cancel`` (broadcast to workers) + key ``spindle:cancelled:<request_id>``
           (for a job that is picked up after the broadcast went out)
Workers:   key ``spindle:worker:<worker_id>`` (JSON ``WorkerInfo``, expires after the heartbeat TTL)
Progress:  key ``spindle:progress:<request_id>`` (tokens delivered so far, for takeover after a crash)
Dead jobs: stream ``spindle:deadletter``
Idempotency: hash ``spindle:idem:<scope>:<key>`` (scope: a digest of the caller's identity, key: a digest
           of its ``Idempotency-Key``; fields: ``IDEM_FIELDS`` below), kept ``IDEMPOTENCY_TTL``; key
           ``spindle:stream:<request_id>`` -> the name of that hash (``GET /v1/streams/<request_id>``)
Limits:    hash ``spindle:ratelimit:<identity>`` (the caller's request and token buckets, gateway/ratelimit.py)
Control:   channel ``spindle:control`` (``ControlMessage``: model-manager -> workers, load/unload)
Manager:   rq queue ``spindle-models`` (pull/import/optimize jobs), key ``spindle:manager:lock:<name>``
           (id of the job writing that model name), hash ``spindle:manager:stats`` (job and byte counters)
"""

from __future__ import annotations

PREFIX = "spindle"
JOBS_GROUP = "workers"
CANCEL_CHANNEL = f"{PREFIX}:cancel"
CONTROL_CHANNEL = f"{PREFIX}:control"
DEADLETTER_STREAM = f"{PREFIX}:deadletter"
WORKER_KEY_PATTERN = f"{PREFIX}:worker:*"
MODEL_JOBS_QUEUE = f"{PREFIX}-models"
MANAGER_STATS_KEY = f"{PREFIX}:manager:stats"


def jobs_stream(model: str) -> str:
    return f"{PREFIX}:jobs:{model}"


def events_channel(gateway_id: str) -> str:
    return f"{PREFIX}:events:{gateway_id}"


def worker_key(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"


def cancelled_key(request_id: str) -> str:
    return f"{PREFIX}:cancelled:{request_id}"


def progress_key(request_id: str) -> str:
    return f"{PREFIX}:progress:{request_id}"


def rate_limit_key(identity: str) -> str:
    return f"{PREFIX}:ratelimit:{identity}"


def manager_lock_key(model: str) -> str:
    return f"{PREFIX}:manager:lock:{model}"


# The fields of an idempotency record (gateway/idempotency.py). Claimed: fp (SHA-256 of the method,
# path and canonical JSON body), rid (the request id), state ("pending"), meta (JSON
# ``IdempotencyMeta``), deadline (unix seconds). Finished: state "done", status, ctype, stored ("1"
# when body holds the response, "0" when it was larger than IDEMPOTENCY_MAX_RESPONSE_BYTES), body.
IDEM_FIELDS = ("fp", "rid", "state", "meta", "deadline", "status", "ctype", "stored", "body")


def idempotency_key(scope: str, key_digest: str) -> str:
    return f"{PREFIX}:idem:{scope}:{key_digest}"


def stream_key(request_id: str) -> str:
    return f"{PREFIX}:stream:{request_id}"
