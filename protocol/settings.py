"""Settings for every service, read from environment variables only.

One class per service; the variable names are the field names in upper case (no prefix, because the
names users know from the seeds -- ``REDIS_URL``, ``QUEUE_CAPACITY``, ``MAX_CONCURRENT_REQUESTS`` --
are what they will type). Every variable is listed with its default in ``.env.example``; the test
``tests/unit/test_env_example.py`` keeps the two in step.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


def _default_instance_id(prefix: str) -> str:
    return f"{prefix}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class CommonSettings(BaseSettings):
    """What every service needs: where Redis and the artifacts are, which model is the default."""

    model_config = SettingsConfigDict(extra="ignore", env_file=None, populate_by_name=True)

    redis_url: str = "redis://127.0.0.1:6379/0"
    artifacts_dir: Path = REPO_ROOT / "var" / "artifacts"
    # Models shipped inside the repo/image (the offline default); searched after artifacts_dir.
    bundled_models_dir: Path = REPO_ROOT / "models"
    default_model: str = "tiny-shakespeare"
    log_level: str = "INFO"
    log_format: str = Field(default="json", description="json or text")


class GatewaySettings(CommonSettings):
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8000
    gateway_id: str = Field(default_factory=lambda: _default_instance_id("gw"))
    # Comma-separated bearer keys; empty means no auth.
    api_keys: str = ""
    # Jobs waiting in one model's stream (not yet taken by a worker) before new ones get a 429.
    queue_capacity: int = 256
    # In-flight requests per API key (or per client address when auth is off); 0 = unlimited.
    max_concurrent_requests: int = 0
    # Requests per minute per API key (or client address without auth), shared by every gateway
    # through Redis; past it a 429 with Retry-After. 0 = unlimited.
    rate_limit_rpm: int = 0
    # Tokens per minute per API key: prompt + max_tokens reserved at admission, the unused part given
    # back when the request ends. 0 = unlimited.
    rate_limit_tpm: int = 0
    # Per-key limits instead of the two above: key:rpm:tpm entries, comma-separated (0 = unlimited).
    # It names the keys: keep it as secret as API_KEYS.
    api_key_limits: str = ""
    # Seconds a request may take end to end; the job's deadline.
    request_timeout: float = 300.0
    # Seconds without any event from the worker, once it has started a request, before the request
    # fails with a timeout (and its job is cancelled).
    event_timeout: float = 60.0
    # Default max_tokens when a request gives none.
    default_max_tokens: int = 256
    # Largest request body accepted, bytes.
    max_request_bytes: int = 1_000_000
    # A live worker is one whose heartbeat is younger than this (seconds); the key's TTL.
    heartbeat_ttl: float = 10.0
    # Seconds between samples of queue depth, live workers and Redis health for /metrics; 0 = off.
    queue_metrics_interval: float = 5.0
    # Seconds a SIGTERMed gateway lets open requests (streams) finish; meanwhile /ready and new
    # requests answer 503. Then it exits, cutting what is still open.
    gateway_drain_timeout: float = 30.0
    # Seconds an Idempotency-Key is remembered (its request, then its response for replay).
    idempotency_ttl: float = 86400.0
    # Largest response kept for replay, bytes; a larger one is not replayed (409; a stream is rebuilt
    # from its event log while the workers keep it).
    idempotency_max_response_bytes: int = 1_000_000


class WorkerSettings(CommonSettings):
    worker_id: str = Field(default_factory=lambda: _default_instance_id("wk"))
    # Comma-separated model names this worker serves; empty means default_model.
    worker_models: str = ""
    # Engine: "paged" (continuous batching, the default), "simple" (one sequence at a time) or
    # "echo" (no model; for testing the serving fabric only).
    engine: str = "paged"
    # Echo engine only: seconds each step sleeps, standing in for a forward pass (tests, load drills).
    echo_step_delay: float = 0.002
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    max_batch: int = 32
    max_num_batched_tokens: int = 512
    kv_cache_memory: str = "512MiB"
    kv_block_size: int = 16
    heartbeat_interval: float = 2.0
    heartbeat_ttl: float = 10.0
    # Seconds a SIGTERMed worker lets in-flight jobs finish before handing the rest back.
    drain_timeout: float = 30.0
    # A pending job idle this long (ms) in a dead worker's list is taken over.
    claim_idle_ms: int = 15_000
    # Deliveries after which a job goes to the dead-letter stream.
    max_deliveries: int = 3
    # Seconds a request's event log (spindle:progress:<id>) is kept: takeover and stream resume read it.
    progress_ttl: float = 900.0
    # Most models one worker holds at once; a "load" control message beyond it is declined.
    max_models: int = 2
    # Unload a model (not the worker's last) after this many idle seconds; 0 = never.
    model_idle_unload: float = 0.0
    worker_metrics_port: int = 0  # 0 = no metrics server
    # Address the metrics server listens on (0.0.0.0 in containers, so Prometheus can scrape it).
    worker_metrics_host: str = "127.0.0.1"
    torch_threads: int = 0  # 0 = torch's default
    # Paged engine, float32 on the CPU: pre-pack linear weights for oneDNN (1.1-1.75x faster matmuls;
    # the LM head of a tied-embedding model gets its own packed copy). See worker/engine/cpu_linear.py.
    cpu_packed_weights: bool = True

    def served_models(self) -> list[str]:
        names = [m.strip() for m in self.worker_models.split(",") if m.strip()]
        return names or [self.default_model]


class ManagerSettings(CommonSettings):
    manager_host: str = "127.0.0.1"
    manager_port: int = 8001
    admin_api_key: str = ""
    # Largest tarball accepted by POST /models/import, bytes.
    max_upload_bytes: int = 20 * 1024**3
    allow_pickle_weights: bool = False
    hf_token: str = ""
    # The Hugging Face Hub (or a mirror); empty means huggingface_hub's default (https://huggingface.co).
    hf_endpoint: str = ""
    # POST /models/import {"path": ...} reads only below this directory (tarball uploads go anywhere).
    import_dir: Path = REPO_ROOT / "var" / "imports"
    # Bytes a pull/import/optimize must leave free on the artifact volume.
    min_free_disk_bytes: int = 1024**3
    # A running job whose progress has not been refreshed for this long counts as dead (its worker
    # crashed), so a new pull of the same name may take over and resume its partial download.
    job_stale_seconds: float = 30.0
    # Comma-separated Hub repo ids the model-manager pulls when it starts, if not in the volume yet.
    pull_on_start: str = ""


class UISettings(CommonSettings):
    ui_port: int = 3000
    gateway_url: str = "http://127.0.0.1:8000"
    manager_url: str = "http://127.0.0.1:8001"
    api_key: str = ""
    admin_api_key: str = ""


class LauncherSettings(CommonSettings):
    """``spindle up``: the embedded run (local processes, an embedded Redis)."""

    # Which services to start; "redis" is started only when REDIS_URL is not set in the environment.
    services: str = "gateway,worker,model-manager,ui"
    worker_count: int = 1
    embedded_redis_port: int = 6379
    # Where the embedded Redis keeps its data (and the launcher its logs).
    state_dir: Path = REPO_ROOT / "var"
    # First metrics port of the workers (worker i gets base + i); 0 = no worker metrics.
    worker_metrics_port_base: int = 9100
    # Seconds to wait for children to exit after SIGTERM before SIGKILL.
    shutdown_grace: float = 40.0
