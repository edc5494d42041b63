"""Logging set-up shared by every service: one JSON object per line (or plain text).

Fields: ts, level, service, logger, msg, plus any of request_id, trace_id, model, worker_id passed
with ``extra={...}``. A line logged inside a traced request gets that request's ``trace_id`` without
being given it (``protocol.tracing``).
"""

from __future__ import annotations

import json
import logging
import sys
import time

from protocol.tracing import current_trace_id

CONTEXT_FIELDS = ("request_id", "trace_id", "model", "worker_id", "gateway_id")


class JSONFormatter(logging.Formatter):
    def __init__(self, service: str, fields: dict[str, str] | None = None):
        super().__init__()
        self.service = service
        self.fields = fields or {}  # on every line unless the record has its own (e.g. worker_id)

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
            **self.fields,
        }
        for f in CONTEXT_FIELDS:
            v = getattr(record, f, None)
            if v is not None:
                out[f] = v
        if "trace_id" not in out and (trace_id := current_trace_id()):
            out["trace_id"] = trace_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(service: str, level: str = "INFO", fmt: str = "json", fields: dict[str, str] | None = None) -> None:
    """``fields``: context put on every JSON line of this process, e.g. ``{"worker_id": ...}``."""
    handler = logging.StreamHandler(sys.stdout)
    if fmt == "json":
        handler.setFormatter(JSONFormatter(service, fields))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
