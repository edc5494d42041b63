"""Chat: pick a model and sampling settings, stream replies, stop them, see TTFT and tokens/s.

Stop: pressing the button makes Streamlit rerun the script, which interrupts this run inside one of
the streaming callbacks; the client then closes the HTTP stream and the gateway cancels the job.
The reply so far is kept in ``chat_pending`` while it streams, so the rerun files it as "stopped".
Any other click during a stream ends it the same way (that is how Streamlit runs scripts).
"""

from __future__ import annotations

import time
from typing import Any

import streamlit as st

from ui.client import ChatResult, ServiceError
from ui.common import attempt, clients, reply_caption, show_error

RENDER_INTERVAL = 0.05  # seconds between two redraws of a growing reply
CURSOR = " ▌"
MAX_TOKENS = 32768

c = clients()
ss = st.session_state
ss.setdefault("chat_history", [])
ss.setdefault("chat_pending", None)


def meta_of(res: ChatResult, finish: str | None) -> dict[str, Any]:
    return {"model": res.model, "ttft": res.ttft, "tokens": res.tokens, "tps": res.tokens_per_second,
            "finish": finish}


# A reply that was streaming when the previous run was interrupted (Stop, or any other click).
if ss.chat_pending is not None:
    res: ChatResult = ss.chat_pending
    ss.chat_pending = None
    res.ended_at = res.ended_at or time.monotonic()
    ss.chat_history.append({"role": "assistant", "content": res.text, "meta": meta_of(res, "stopped")})

st.title("Chat")

# ------------------------------------------------------------------------------------------ settings
models = attempt(c.gateway.models) or []
served = [m["id"] for m in models if m.get("served")]
idle = [m["id"] for m in models if not m.get("served")]
options = served + idle or [c.settings.default_model]
context = {m["id"]: m.get("context_length") for m in models}
with st.sidebar:
    st.subheader("Chat settings")
    default = options.index(c.settings.default_model) if c.settings.default_model in options else 0
    model = st.selectbox("Model", options, index=default, key="chat_model",
                         format_func=lambda m: m if m in served or not models else f"{m} (not loaded)")
    temperature = st.slider("Temperature", 0.0, 2.0, 0.7, 0.05, key="chat_temperature")
    top_p = st.slider("Top p", 0.05, 1.0, 1.0, 0.05, key="chat_top_p")
    # A fixed range (one widget for every model): a request past the model's context gets the gateway's
    # readable 400 naming both numbers.
    max_tokens = st.number_input("Max tokens", min_value=1, max_value=MAX_TOKENS, value=256, step=32,
                                 key="chat_max_tokens",
                                 help=f"{model}: context of {context[model]} tokens" if context.get(model) else None)
    system_prompt = st.text_area("System prompt", key="chat_system", placeholder="You are a helpful assistant.")
    if st.button("Clear conversation", icon=":material/delete_sweep:", key="chat_clear"):
        ss.chat_history = []

if models and model not in served:
    st.info(f"No worker serves **{model}** right now: load it on the Models page, or pick a served model.",
            icon=":material/info:")

# ------------------------------------------------------------------------------------------- history
for msg in ss.chat_history:
    with st.chat_message(msg["role"]):
        if msg.get("content"):
            st.markdown(msg["content"])
        if msg.get("error"):
            st.error(msg["error"], icon=":material/error:")
        if msg.get("meta"):
            st.caption(reply_caption(msg["meta"]))

# ----------------------------------------------------------------------------------------- new turn
prompt = st.chat_input("Message the model", key="chat_prompt")
if prompt:
    ss.chat_history.append({"role": "user", "content": prompt})
    with st.chat_message("user"):
        st.markdown(prompt)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    messages += [{"role": m["role"], "content": m["content"]} for m in ss.chat_history if m.get("content")]

    with st.chat_message("assistant"):
        out = st.empty()
        stop_slot = st.empty()
        stop_slot.button("Stop", icon=":material/stop_circle:", key="chat_stop", type="primary")
        res = ChatResult()
        ss.chat_pending = res
        draw = {"at": 0.0, "dots": 0}

        def on_text(_piece: str) -> None:
            now = time.monotonic()
            if now - draw["at"] >= RENDER_INTERVAL:
                out.markdown(res.text + CURSOR)
                draw["at"] = now

        def on_wait() -> None:
            # Also gives Streamlit the chance to interrupt this run when Stop was pressed meanwhile.
            draw["dots"] = draw["dots"] % 3 + 1
            out.markdown(res.text + CURSOR if res.text else "_waiting for the first token_ " + "." * draw["dots"])

        error: ServiceError | None = None
        try:
            c.gateway.chat(model, messages, on_text=on_text, on_wait=on_wait, temperature=temperature,
                           top_p=top_p, max_tokens=int(max_tokens), result=res)
        except ServiceError as e:
            error = e
        ss.chat_pending = None
        stop_slot.empty()
        if res.text:
            out.markdown(res.text)
        else:
            out.empty()
        finish = res.finish_reason or ("error" if error else None)
        if error is not None:
            show_error(error)
        meta = meta_of(res, finish)
        st.caption(reply_caption(meta))
        ss.chat_history.append({"role": "assistant", "content": res.text, "meta": meta,
                                "error": error.message if error else None})
