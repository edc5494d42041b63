"""``python -m gateway``: serve the gateway with uvicorn (settings from the environment).

SIGTERM (or Ctrl-C) drains before uvicorn's own shutdown. Uvicorn alone would close the listening
socket at once: a load balancer's probe would get "connection refused" instead of a 503, and clients
already routed here an error they cannot tell from a crash. So the first signal only starts
``gateway.app.drain``: ``/ready`` answers 503 (the balancer takes the instance out), new requests
get 503 with ``Retry-After``, open streams go on, for at most ``GATEWAY_DRAIN_TIMEOUT`` seconds
(past it, each one still open ends with a ``shutting_down`` error event and its job is cancelled).
Then uvicorn shuts down: it closes the socket and idle connections and gives any other request still
open ``SHUTDOWN_GRACE`` seconds; the process exits with 0. A second signal exits at once, as
uvicorn does on its own.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from gateway.app import create_app, drain
from protocol.logs import setup_logging
from protocol.settings import GatewaySettings
from protocol.tracing import setup_tracing, shutdown_tracing

log = logging.getLogger("gateway")

SHUTDOWN_GRACE = 3  # seconds uvicorn waits for connections after the drain, before cancelling them


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float):
        super().__init__(config)
        self.app = app
        self.drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler (main thread, between two bytecodes of the loop): schedule the drain."""
        if self._loop is None or self._draining is not None or self.should_exit:
            super().handle_exit(sig, frame)  # a second signal: exit now
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain_then_exit(), name="gateway-drain")

    async def _drain_then_exit(self) -> None:
        try:
            await drain(self.app, self.drain_timeout)
        finally:
            self.should_exit = True


def main() -> None:
    settings = GatewaySettings()
    setup_logging("gateway", settings.log_level, settings.log_format, {"gateway_id": settings.gateway_id})
    setup_tracing("gateway")
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.gateway_host, port=settings.gateway_port, log_config=None,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE, proxy_headers=False)
    try:
        DrainingServer(config, app, settings.gateway_drain_timeout).run()
    finally:
        shutdown_tracing()  # export the spans still buffered


if __name__ == "__main__":
    main()
