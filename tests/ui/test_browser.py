"""The UI in a real browser: Debian's Chromium driven by Playwright, against the system ``spindle up`` started.

Screenshots of every step go to the session's temporary directory (the test prints where); with
``UPDATE_SCREENSHOTS=1`` the three main ones are also copied to ``docs/screenshots/`` for the README.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import REPO
from tests.ui.conftest import API_KEY, MODEL, PULL_REPO, UIStack, eventually

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
DOCS_SHOTS = REPO / "docs" / "screenshots"
VIEWPORT = {"width": 1400, "height": 1000}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed at /usr/bin/chromium (scripts/install-test-tools.sh installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                                   "(pip install -e '.[dev]')")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport=VIEWPORT)
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    yield pg
    context.close()


def open_page(pg: Any, stack: UIStack, path: str, title: str) -> None:
    pg.goto(f"{stack.system.ui}/{path}")
    pg.get_by_role("heading", name=title, level=1).wait_for()


def shot(pg: Any, stack: UIStack, name: str, docs: bool = False) -> Path:
    path = stack.shots / f"{name}.png"
    pg.screenshot(path=str(path))
    print(f"screenshot: {path}")
    if docs and os.environ.get("UPDATE_SCREENSHOTS") == "1":
        DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, DOCS_SHOTS / f"{name}.png")
    return path


def cancellations(stack: UIStack) -> float:
    m = re.search(r'^spindle_gateway_cancellations_total\{reason="client_gone"\} (\S+)$',
                  stack.gw("/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def settings(pg: Any, *, temperature: float, max_tokens: int) -> None:
    """Set the sidebar's temperature (with the keyboard, 0.05 a step) and max tokens."""
    slider = pg.get_by_role("slider", name="Temperature")
    slider.press("Home")
    for _ in range(round(temperature / 0.05)):
        slider.press("ArrowRight")
    thumb = pg.get_by_test_id("stSlider").filter(has_text="Temperature").get_by_test_id("stSliderThumbValue")
    thumb.get_by_text(f"{temperature:.2f}", exact=True).wait_for()
    box = pg.get_by_role("spinbutton", name="Max tokens")
    box.fill(str(max_tokens))
    box.press("Enter")
    pg.wait_for_function("n => document.querySelector('input[aria-label=\"Max tokens\"]').value == n",
                         arg=str(max_tokens))


def send(pg: Any, text: str) -> None:
    box = pg.get_by_test_id("stChatInputTextArea")
    box.fill(text)
    box.press("Enter")


def test_chat_streams_and_stop_cancels(page: Any, ui_stack: UIStack) -> None:
    ui_stack.wait_idle()
    pg = page
    open_page(pg, ui_stack, "", "Chat")
    settings(pg, temperature=0.0, max_tokens=3000)  # greedy: the random model never says EOS here
    before = cancellations(ui_stack)
    send(pg, "Tell me a long story")

    reply = pg.get_by_test_id("stChatMessage").nth(1)
    stop = pg.get_by_role("button", name="Stop")
    stop.wait_for()
    lengths: list[int] = []
    while len([n for n in set(lengths) if n > 0]) < 3:  # the text appears and grows, piece by piece
        lengths.append(len(reply.inner_text()))
        assert stop.is_visible(), "the reply ended before it could be seen growing"
        time.sleep(0.2)
    grown = [n for n in lengths if n > 0]
    assert grown == sorted(grown), lengths
    shot(pg, ui_stack, "chat-streaming")

    stop.click()
    caption = reply.get_by_test_id("stCaptionContainer")
    caption.wait_for()
    stop.wait_for(state="detached")  # gone once the rerun that filed the reply has finished
    text = caption.inner_text()
    assert "stopped" in text and "TTFT" in text and "tok/s" in text, text
    tokens = int(re.search(r"(\d+) tokens", text).group(1))
    assert 0 < tokens < 3000
    # The gateway saw the client go and cancelled the job; the worker freed its slot.
    eventually(lambda: cancellations(ui_stack) == before + 1, 30, "gateway cancellation")
    ui_stack.wait_idle()
    frozen = reply.inner_text()
    time.sleep(1.0)
    assert reply.inner_text() == frozen
    shot(pg, ui_stack, "chat-stopped")

    # A short, complete exchange for the README (with the bundled model when there is one).
    pg.get_by_role("button", name="Clear conversation").click()
    pg.wait_for_function("() => document.querySelectorAll('[data-testid=stChatMessage]').length == 0")
    if ui_stack.nice_model:
        pg.get_by_role("combobox", name="Model").click()
        pg.get_by_role("option", name=ui_stack.nice_model, exact=True).click()
        pg.wait_for_function("v => document.querySelector('input[aria-label=\"Model\"]').value == v",
                             arg=ui_stack.nice_model)
        settings(pg, temperature=0.7, max_tokens=60)
    else:
        settings(pg, temperature=0.7, max_tokens=40)
    send(pg, "Good morrow! What news from the court?")
    pg.get_by_test_id("stChatMessage").nth(1).get_by_test_id("stCaptionContainer").wait_for()
    shot(pg, ui_stack, "chat", docs=True)


def test_stop_while_waiting_for_the_first_token(page: Any, ui_stack: UIStack) -> None:
    """Stop works before any token arrives (queued, prefill): here the system's worker is frozen."""
    ui_stack.wait_idle()
    pg = page
    open_page(pg, ui_stack, "", "Chat")
    worker = next(c for c in psutil.Process(ui_stack.system.proc.pid).children(recursive=True)
                  if c.cmdline()[-2:] == ["-m", "worker"])
    before = cancellations(ui_stack)
    worker.suspend()
    try:
        send(pg, "Are you there?")
        pg.get_by_text("waiting for the first token").wait_for()
        pg.get_by_role("button", name="Stop").click()
        eventually(lambda: cancellations(ui_stack) == before + 1, 10, "gateway cancellation")
    finally:
        worker.resume()
    caption = pg.get_by_test_id("stChatMessage").nth(1).get_by_test_id("stCaptionContainer").inner_text()
    assert "0 tokens" in caption and "stopped" in caption, caption
    ui_stack.wait_idle()


def test_pull_shows_progress_to_100_and_the_model_appears(page: Any, ui_stack: UIStack) -> None:
    pg = page
    open_page(pg, ui_stack, "models", "Models")
    name = PULL_REPO.split("/")[1]
    assert pg.get_by_role("table").first.get_by_text(name, exact=True).count() == 0
    pg.get_by_label("Hub repo id").fill(PULL_REPO)
    pg.get_by_role("button", name="Pull").click()

    seen: list[int] = []
    done = pg.get_by_test_id("stAlertContentSuccess")
    deadline = time.monotonic() + 60
    while not done.count():
        assert time.monotonic() < deadline, f"pull did not finish; progress seen: {seen}"
        # The first bar on the page: the job's while it runs, then the 100% one above the refreshed list.
        values = pg.eval_on_selector_all("[role=progressbar]", "els => els.map(e => e.getAttribute('aria-valuenow'))")
        if values and values[0] is not None and (not seen or int(values[0]) != seen[-1]):
            seen.append(int(values[0]))
            if 0 < seen[-1] < 100 and not (ui_stack.shots / "models-pulling.png").exists():
                shot(pg, ui_stack, "models-pulling")
        time.sleep(0.1)
    assert seen == sorted(seen), seen
    assert any(0 < v < 100 for v in seen), f"no intermediate progress: {seen}"
    assert done.inner_text().startswith(f"Pull of {PULL_REPO}")
    bar = pg.get_by_role("progressbar").first
    assert bar.get_attribute("aria-valuenow") == "100"
    row = pg.get_by_role("table").first.get_by_role("row").filter(has_text=name)
    row.wait_for()
    assert "ready" in row.inner_text() and "float32" in row.inner_text()
    shot(pg, ui_stack, "models", docs=True)


def test_system_page_shows_the_live_worker(page: Any, ui_stack: UIStack) -> None:
    pg = page
    workers = ui_stack.gw("/system").json()["workers"]
    open_page(pg, ui_stack, "system", "System")
    table = pg.get_by_role("table").first
    for w in workers:
        table.get_by_role("row").filter(has_text=w["worker_id"]).filter(has_text=MODEL).wait_for()
    live = pg.get_by_test_id("stMetric").filter(has_text="Live workers")
    _label, value, *_ = [line for line in live.inner_text().splitlines() if line.strip()]
    assert value.strip() == str(len(workers)), live.inner_text()
    # Some traffic while the page watches, so the charts have points; the page refreshes by itself.
    updated = pg.get_by_text(re.compile(r"^Updated \d\d:\d\d:\d\d$"))
    first = updated.inner_text()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 24}
    with httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as client:
        for _ in range(4):
            assert client.post(ui_stack.system.gateway + "/v1/chat/completions", json=body).status_code == 200
            time.sleep(1.0)
    pg.wait_for_function("t => ![...document.querySelectorAll('p')].some(p => p.innerText === t)", arg=first)
    pg.get_by_text("Throughput").wait_for()
    pg.locator("[data-testid=stVegaLiteChart]").first.wait_for()
    time.sleep(0.5)
    pg.set_viewport_size({"width": 1400, "height": 1250})
    shot(pg, ui_stack, "system", docs=True)
