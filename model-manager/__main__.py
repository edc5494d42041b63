"""``python -m model_manager``: the model-manager REST API on MANAGER_HOST:MANAGER_PORT."""

from __future__ import annotations

import uvicorn

from model_manager.app import create_app
from protocol.logs import setup_logging
from protocol.settings import ManagerSettings


def main() -> None:
    settings = ManagerSettings()
    setup_logging("model-manager", settings.log_level, settings.log_format)
    uvicorn.run(create_app(settings), host=settings.manager_host, port=settings.manager_port, log_config=None,
                timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
