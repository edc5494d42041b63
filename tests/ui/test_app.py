"""The UI's pages driven by Streamlit's AppTest against the running system (no mocks).

AppTest runs ``ui/app.py`` in this process; its widgets are set and clicked as a user would, and each
``run()`` executes the script against the real gateway and model-manager.
"""

from __future__ import annotations

import io
import tarfile
import threading

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import REPO
from tests.ui.conftest import HOG_KEY, MAX_CONCURRENT, MODEL, PULL_REPO_2, UIStack, eventually

APP = str(REPO / "ui" / "app.py")
TIMEOUT = 90


def app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    return at


def page(name: str) -> AppTest:
    at = app()
    at.switch_page(f"views/{name}.py").run()
    assert not at.exception, at.exception
    return at


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def send(at: AppTest, text: str, max_tokens: int = 16) -> AppTest:
    at.number_input(key="chat_max_tokens").set_value(max_tokens)
    at.chat_input(key="chat_prompt").set_value(text).run()
    assert not at.exception, at.exception
    return at


# ------------------------------------------------------------------------------------------------ chat
def test_chat_streams_a_reply_with_ttft_and_speed(ui_stack: UIStack) -> None:
    ui_stack.wait_idle()
    at = app()
    assert at.selectbox(key="chat_model").value == MODEL
    at.slider(key="chat_temperature").set_value(0.0)
    send(at, "Speak, good sir", max_tokens=12)
    assert not errors(at)
    messages = at.chat_message
    assert [m.name for m in messages] == ["user", "assistant"]
    reply = messages[1]
    assert reply.markdown[0].value.strip()
    caption = reply.caption[0].value
    assert MODEL in caption and "TTFT" in caption and "12 tokens" in caption and "tok/s" in caption
    assert "length" in caption
    # The history stays in the session: a second turn shows all four messages.
    send(at, "And then?", max_tokens=4)
    assert [m.name for m in at.chat_message] == ["user", "assistant", "user", "assistant"]
    at.button(key="chat_clear").click().run()
    assert not at.chat_message


def test_chat_overloaded_is_a_readable_error(ui_stack: UIStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """MAX_CONCURRENT_REQUESTS streams held open with one key: the next request with it gets a 429."""
    ui_stack.wait_idle()
    opened = threading.Semaphore(0)
    stop = threading.Event()

    def hog() -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 3000,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", ui_stack.system.gateway + "/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {HOG_KEY}"}) as r:
            assert r.status_code == 200
            opened.release()
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    threads = [threading.Thread(target=hog, daemon=True) for _ in range(MAX_CONCURRENT)]
    for t in threads:
        t.start()
    try:
        for _ in threads:
            assert opened.acquire(timeout=30)
        monkeypatch.setenv("API_KEY", HOG_KEY)
        at = send(app(), "one more?")
        msgs = errors(at)
        assert len(msgs) == 1 and "overloaded" in msgs[0] and "Try again" in msgs[0], msgs
        assert "Traceback" not in msgs[0]
    finally:
        stop.set()
        for t in threads:
            t.join(30)


def test_chat_gateway_down_and_bad_key_are_readable(ui_stack: UIStack, monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.redis_server import free_port

    monkeypatch.setenv("GATEWAY_URL", f"http://127.0.0.1:{free_port()}")
    at = app()
    assert any("Cannot reach the gateway" in m for m in errors(at)), errors(at)
    send(at, "hello?")
    assert not at.exception
    assert sum("Cannot reach the gateway" in m for m in errors(at)) == 2

    monkeypatch.setenv("GATEWAY_URL", ui_stack.system.gateway)
    monkeypatch.setenv("API_KEY", "wrong-key")
    at = app()
    assert any("Invalid API key" in m and "API_KEY" in m for m in errors(at)), errors(at)


# ---------------------------------------------------------------------------------------------- models
def models_rows(at: AppTest) -> dict[str, dict]:
    """The model list (the dataframe with a status column) by name."""
    return {r["name"]: r for t in at.table for r in t.value.to_dict("records") if "status" in r}


def test_models_list_shows_status_and_workers(ui_stack: UIStack) -> None:
    at = page("models")
    assert not errors(at)
    row = models_rows(at)[MODEL]
    serving = [w["worker_id"] for w in ui_stack.gw("/system").json()["workers"] if MODEL in w["models"]]
    assert row["status"] == "serving" and row["workers"] == ", ".join(serving)
    assert row["dtype"] == "float32" and row["size"].endswith("KB") and row["context"] == 4096


def test_search_then_pull_then_delete_with_confirmation(ui_stack: UIStack) -> None:
    at = page("models")
    at.text_input(key="search_q").set_value("tiny-chat")
    next(b for b in at.button if b.label == "Search").click().run()
    assert not errors(at)
    assert any(PULL_REPO_2 in m.value for m in at.markdown)
    at.button(key="search_pull_0").click().run()  # follows the job's progress stream to the end
    assert not errors(at), errors(at)
    assert any("tiny-chat ready" in s.value for s in at.success)
    assert any(p.value == 100 for p in at.get("progress"))
    assert "tiny-chat" in models_rows(at)

    at.selectbox(key="mm_target").set_value("tiny-chat").run()
    at.button(key="mm_delete").click().run()
    assert any("cannot be undone" in w.value for w in at.warning)
    assert "tiny-chat" in models_rows(at)  # nothing deleted before the confirmation
    at.button(key="mm_delete_yes").click().run()
    assert any("Deleted tiny-chat" in s.value for s in at.success)
    assert "tiny-chat" not in models_rows(at)


def test_import_then_load_and_unload(ui_stack: UIStack) -> None:
    at = page("models")
    at.text_input(key="import_name").set_value("tiny-imported")
    at.text_input(key="import_path").set_value("tiny-src")
    next(b for b in at.button if b.label == "Import").click().run()
    assert not errors(at), errors(at)
    assert models_rows(at)["tiny-imported"]["status"] == "ready"

    at.selectbox(key="mm_target").set_value("tiny-imported").run()
    at.button(key="mm_load").click().run()
    assert any("Asked the workers to load tiny-imported" in s.value for s in at.success), errors(at)
    eventually(lambda: ui_stack.served("tiny-imported"), 60, "tiny-imported served")
    at.run()
    assert models_rows(at)["tiny-imported"]["status"] == "serving"

    at.button(key="mm_unload").click().run()
    assert not errors(at)
    eventually(lambda: not ui_stack.served("tiny-imported"), 60, "tiny-imported unloaded")
    at.run()
    assert models_rows(at)["tiny-imported"]["status"] == "ready"


def test_import_a_tarball_upload(ui_stack: UIStack) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(ui_stack.tmp / "imports" / "tiny-src", arcname="tiny-src")
    at = page("models")
    at.radio(key="import_source").set_value("Upload a tarball").run()
    at.text_input(key="import_name").set_value("tiny-uploaded")
    at.get("file_uploader")[0].upload("tiny-src.tar.gz", buf.getvalue(), "application/gzip")
    next(b for b in at.button if b.label == "Import").click().run()
    assert not errors(at), errors(at)
    assert any("tiny-uploaded ready" in s.value for s in at.success)
    assert models_rows(at)["tiny-uploaded"]["source"].startswith("import:")


def test_optimize_shows_the_quality_gate(ui_stack: UIStack) -> None:
    at = page("models")
    at.selectbox(key="opt_source").set_value(MODEL)
    at.multiselect(key="opt_passes").set_value(["bf16"])
    next(b for b in at.button if b.label == "Optimize").click().run()
    assert not at.exception
    ok = [s.value for s in at.success]
    if ok:  # the gate passed: the table shows its numbers
        assert any(f"{MODEL}-bf16" in s for s in ok)
        gate = at.table[0].value.to_dict("records")
        assert gate[0]["model"] == f"{MODEL}-bf16" and gate[0]["gate"] == "passed"
        assert gate[0]["ratio"] <= gate[0]["max ratio"]
        assert f"{MODEL}-bf16" in models_rows(at)
    else:  # a failed gate is reported with its numbers, and nothing is kept
        assert any("perplexity" in e or "agreement" in e for e in errors(at)), errors(at)


# ---------------------------------------------------------------------------------------------- system
def test_system_page_shows_workers_queues_and_redis(ui_stack: UIStack) -> None:
    at = page("system")
    assert not errors(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Redis"] == "up"
    assert int(metrics["Live workers"]) >= 1
    workers = at.table[0].value.to_dict("records")
    assert any(MODEL in w["models"] and w["state"] == "live" and "s ago" in w["last heartbeat"]
               for w in workers)
    assert any(q["model"] == MODEL for q in at.table[1].value.to_dict("records"))
