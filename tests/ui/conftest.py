"""One running system for every UI test: ``spindle up`` (as the README does) on free ports, with a random
tiny-llama as the default model, a local Hugging Face Hub stand-in to pull from, an import directory,
API keys on the gateway and an admin key on the model-manager (so the UI's keys are exercised).

AppTest runs the app in this process: the session fixture points its environment (GATEWAY_URL,
MANAGER_URL, API_KEY, ADMIN_API_KEY, DEFAULT_MODEL) at the system. The browser tests open the UI
that ``spindle up`` started.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO
from tests.e2e.conftest import System, start_system, stop_system
from tests.hub_standin import HubStandin

MODEL = "tiny-llama"
NICE_MODEL = "tiny-shakespeare"  # the bundled model, when it exists: readable text for the screenshots
API_KEY, HOG_KEY, ADMIN_KEY = "ui-test-key", "ui-hog-key", "ui-admin-key"
# Concurrent requests per API key: the overload test holds this many streams open with HOG_KEY.
MAX_CONCURRENT = 2
PULL_REPO, PULL_REPO_2 = "acme/tiny-pull", "acme/tiny-chat"
HUB_RATE = 150_000  # bytes/s: a pull of the tiny model takes about 3 s, so progress is visible
CONTEXT = 4096  # long enough for a generation that is still running when the test presses Stop


@dataclass
class UIStack:
    system: System
    hub: HubStandin
    tmp: Path
    shots: Path  # screenshots of this run
    nice_model: str | None  # tiny-shakespeare when bundled

    def gw(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.system.gateway + path, headers={"Authorization": f"Bearer {API_KEY}"},
                         timeout=10, **kw)

    def mm(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(method, self.system.manager + path, timeout=30,
                             headers={"Authorization": f"Bearer {ADMIN_KEY}"}, **kw)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until no worker runs a request and no job is in flight (a stopped stream has been cancelled)."""
        eventually(lambda: self._idle(), timeout, "workers idle")

    def _idle(self) -> bool:
        s = self.gw("/system").json()
        return (all(w["running"] == 0 for w in s["workers"]) and all(q["in_flight"] == 0 for q in s["queues"]))

    def served(self, model: str) -> bool:
        return any(m["id"] == model and m["served"] for m in self.gw("/v1/models").json()["data"])


def eventually(check: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        time.sleep(0.2)


def model_files(src: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in src.iterdir() if p.is_file() and p.name != "manifest.json"}


# Package scope: the stack (and the environment it sets for AppTest) ends with the last UI test, so
# nothing of it leaks into the tests that run after tests/ui.
@pytest.fixture(scope="package")
def ui_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UIStack]:
    from tests.tiny_models import make_tiny_model

    tmp = tmp_path_factory.mktemp("ui")
    make_tiny_model(tmp / "artifacts", MODEL, max_position_embeddings=CONTEXT)
    source = make_tiny_model(tmp / "hub-src", "tiny-src", seed=3)
    shutil.copytree(source, tmp / "imports" / "tiny-src", ignore=shutil.ignore_patterns("manifest.json"))
    hub = HubStandin(rate=HUB_RATE).start()
    for repo in (PULL_REPO, PULL_REPO_2):
        hub.add_repo(repo, files=model_files(source), downloads=42)
    bundled = Path(os.environ.get("BUNDLED_MODELS_DIR") or REPO / "models")
    nice = NICE_MODEL if (bundled / NICE_MODEL / "config.json").is_file() else None
    env = {"DEFAULT_MODEL": MODEL, "WORKER_MODELS": ",".join([MODEL] + ([nice] if nice else [])),
           "MAX_MODELS": "3", "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp / "hf-home"), "MIN_FREE_DISK_BYTES": "0",
           "IMPORT_DIR": str(tmp / "imports"), "API_KEYS": f"{API_KEY},{HOG_KEY}", "API_KEY": API_KEY,
           "ADMIN_API_KEY": ADMIN_KEY, "MAX_CONCURRENT_REQUESTS": str(MAX_CONCURRENT),
           "OMP_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in ("GATEWAY_URL", "MANAGER_URL", "API_KEY", "ADMIN_API_KEY",
                                            "DEFAULT_MODEL")}
    system = start_system(tmp, env)
    try:
        os.environ.update({"GATEWAY_URL": system.gateway, "MANAGER_URL": system.manager, "API_KEY": API_KEY,
                           "ADMIN_API_KEY": ADMIN_KEY, "DEFAULT_MODEL": MODEL})
        # Under the session's temporary directory, or UI_SCREENSHOTS_DIR (CI keeps it as an artifact).
        shots = Path(os.environ.get("UI_SCREENSHOTS_DIR") or tmp / "screenshots")
        shots.mkdir(parents=True, exist_ok=True)
        yield UIStack(system, hub, tmp, shots, nice)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        code = stop_system(system)
        hub.stop()
        assert code == 0, system.log_text()[-3000:]
