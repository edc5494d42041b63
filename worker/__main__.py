"""``python -m worker``: load the configured models and serve their job streams until SIGTERM.

SIGTERM/SIGINT: stop taking jobs, let in-flight ones finish within DRAIN_TIMEOUT, then hand the rest
back to the stream (with the tokens already delivered, so another worker continues them) and exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from protocol.artifacts import ArtifactStore
from protocol.logs import setup_logging
from protocol.settings import WorkerSettings
from protocol.tracing import setup_tracing, shutdown_tracing
from worker.engine.api import Engine
from worker.service import Worker

log = logging.getLogger("worker")


async def serve(settings: WorkerSettings) -> None:
    from worker.engine.loader import load_engine, resolve_device, resolve_dtype

    store = ArtifactStore(settings.artifacts_dir, settings.bundled_models_dir)

    def load(model: str) -> tuple[Engine, str, str]:
        model_dir = store.find(model)
        if model_dir is None:
            raise LookupError(f"model {model!r} is not in {settings.artifacts_dir} nor {settings.bundled_models_dir}")
        engine = load_engine(settings.engine, model_dir, settings.device, settings.dtype, settings)
        device = resolve_device(settings.device)
        return engine, device, str(resolve_dtype(settings.dtype, device)).removeprefix("torch.")

    worker = Worker(settings, loader=load)
    for model in settings.served_models():
        try:
            await worker.launch_model(model)
        except LookupError as e:
            raise SystemExit(str(e)) from e
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await worker.start()
    await stop.wait()
    log.info("stopping: draining for up to %.0fs", settings.drain_timeout)
    left = await worker.drain(settings.drain_timeout)
    if left:
        n = await worker.hand_back()
        log.warning("%d jobs unfinished after the drain; handed back to the queue", n)
    await worker.stop()


def main() -> None:
    settings = WorkerSettings()
    setup_logging("worker", settings.log_level, settings.log_format, {"worker_id": settings.worker_id})
    setup_tracing("worker")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    try:
        asyncio.run(serve(settings))
    finally:
        shutdown_tracing()  # export the spans still buffered


if __name__ == "__main__":
    main()
