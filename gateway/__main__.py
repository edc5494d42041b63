"""``python -m gateway``: serve the gateway with uvicorn (settings from the environment)."""

from __future__ import annotations

import uvicorn

from gateway.app import create_app
from protocol.logs import setup_logging
from protocol.settings import GatewaySettings
from protocol.tracing import setup_tracing, shutdown_tracing


def main() -> None:
    settings = GatewaySettings()
    setup_logging("gateway", settings.log_level, settings.log_format, {"gateway_id": settings.gateway_id})
    setup_tracing("gateway")
    try:
        uvicorn.run(create_app(settings), host=settings.gateway_host, port=settings.gateway_port,
                    log_config=None, timeout_graceful_shutdown=30, proxy_headers=False)
    finally:
        shutdown_tracing()  # export the spans still buffered


if __name__ == "__main__":
    main()
