"""Gateway parts that need no server: event ordering and bounds, SSE encoding, request schemas,
validation-error wording, auth, tokenization and context limits."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import ValidationError

from gateway import sse
from gateway.admission import Admission
from gateway.dispatcher import Dispatcher, Subscription
from gateway.errors import describe_validation
from gateway.openai_format import ChunkMaker, chat_logprobs
from gateway.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest, LlamaCompletionRequest
from gateway.tokenization import TokenizerCache, fallback_chat_prompt
from protocol.artifacts import ArtifactStore
from protocol.errors import APIError
from protocol.messages import EventBatch, TokenEvent, TokenLogprob


def ev(seq: int, text: str = "", finish: str | None = None, rid: str = "r") -> TokenEvent:
    return TokenEvent(request_id=rid, seq=seq, token_ids=[seq], text=text or str(seq), finish_reason=finish,
                      completion_tokens=seq + 1)


async def adrain(sub: Subscription) -> list[TokenEvent]:
    out = []
    while True:
        try:
            out.append(await sub.get(0.01))
        except TimeoutError:
            return out


def drain(sub: Subscription) -> list[TokenEvent]:
    return asyncio.run(adrain(sub))


# -- Subscription ------------------------------------------------------------------------------------
def test_events_are_delivered_in_seq_order_without_duplicates():
    sub = Subscription("r")
    for e in (ev(2), ev(0), ev(0), ev(1), ev(2), ev(3, finish="stop"), ev(4)):
        sub.feed(e)
    got = drain(sub)
    assert [e.seq for e in got] == [0, 1, 2, 3] and got[-1].finish_reason == "stop"
    assert sub.duplicates == 2 and sub.finished


def test_a_slow_reader_gets_merged_events_within_the_bound():
    sub = Subscription("r", max_buffered=4)
    for i in range(100):
        sub.feed(ev(i, finish="length" if i == 99 else None))
    got = drain(sub)
    assert len(got) == 4
    assert "".join(e.text for e in got) == "".join(str(i) for i in range(100))
    assert [t for e in got for t in e.token_ids] == list(range(100))
    assert got[-1].finish_reason == "length" and got[-1].completion_tokens == 100


def test_too_many_early_events_fail_the_request():
    sub = Subscription("r", max_out_of_order=3)
    for i in range(1, 5):
        sub.feed(ev(i))
    with pytest.raises(APIError) as e:
        drain(sub)
    assert e.value.code == "event_gap"


def test_get_times_out_and_failure_comes_after_buffered_events():
    sub = Subscription("r")

    async def go():
        with pytest.raises(TimeoutError):
            await sub.get(0.01)
        sub.feed(ev(0))
        sub.fail(APIError(503, "gone"))
        first = await sub.get(1)
        with pytest.raises(APIError):
            await sub.get(1)
        return first

    assert asyncio.run(go()).seq == 0


def test_dispatcher_routes_batches_and_salvages_malformed_ones():
    async def go():
        d = Dispatcher("redis://unused", "gw")
        d.subscribed.set()
        a, b = d.register("a"), d.register("b")
        d.dispatch(EventBatch(events=[ev(0, rid="a"), ev(0, rid="b"), ev(0, rid="gone")]).encode())
        raw = json.loads(EventBatch(events=[ev(1, rid="a"), ev(1, rid="b")]).encode())
        raw["events"][1]["seq"] = "not a number"
        d.dispatch(json.dumps(raw))
        d.dispatch(b"not json")
        assert [e.seq for e in await adrain(a)] == [0, 1]
        assert d.orphan_events == 1 and d.bad_messages == 2
        with pytest.raises(APIError) as e:
            await b.get(0.1)
            await b.get(0.1)
        assert e.value.code == "malformed_event"
        with pytest.raises(APIError):
            d.register("a")  # already in flight
        d.subscribed.clear()
        with pytest.raises(APIError) as e:
            d.register("c")
        assert e.value.status == 503

    asyncio.run(go())


# -- SSE and wire formats -----------------------------------------------------------------------------
def test_sse_payloads_cannot_break_framing():
    text = "line one\n\ndata: [DONE]\r\nend"
    frame = sse.data({"t": text})
    assert frame.endswith("\n\n") and frame.count("\n") == 2
    assert json.loads(frame.removeprefix("data: "))["t"] == text
    named = sse.event("done", text)
    assert named.count("\n") == 3 and json.loads(named.split("data: ", 1)[1]) == text


def test_chunks_and_logprobs():
    c = ChunkMaker("id", "m", 1, chat=True, include_usage=True)
    assert c.role()["choices"][0]["delta"] == {"role": "assistant", "content": ""} and c.role()["usage"] is None
    assert c.content("", None, "stop")["choices"][0]["delta"] == {}
    assert c.usage(3, 4)["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    lp = chat_logprobs([TokenLogprob(token_id=1, token="é", logprob=float("-inf"), top=[(1, "é", -1.0)])])
    entry = lp["content"][0]
    assert entry["logprob"] == -9999.0 and entry["bytes"] == [195, 169]
    assert entry["top_logprobs"] == [{"token": "é", "logprob": -1.0, "bytes": [195, 169]}]


# -- schemas ------------------------------------------------------------------------------------------
MSG = [{"role": "user", "content": "hi"}]


def test_chat_request_maps_to_sampling_params():
    req = ChatCompletionRequest.model_validate({
        "messages": MSG, "max_completion_tokens": 7, "max_tokens": 99, "temperature": 0, "top_k": -1, "seed": -5,
        "stop": "END", "logprobs": True, "top_logprobs": 3, "unknown_field": {"ignored": True}})
    p = req.sampling(req.requested_max_tokens, logprobs=req.num_logprobs)
    assert (p.max_tokens, p.temperature, p.top_k, p.seed, p.stop, p.logprobs) == (7, 0.0, 0, -5, ["END"], 3)
    assert p.greedy
    parts = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert parts.messages[0].for_template() == {"role": "user", "content": "ab"}


@pytest.mark.parametrize("extra", [{"max_tokens": True}, {"max_tokens": "3"}, {"temperature": "1"}, {"n": 17},
                                   {"top_p": 1.5}, {"stream": 1}, {"response_format": {"type": "json_object"}},
                                   {"logit_bias": {"1": 5}}, {"tool_choice": "required"}])
def test_chat_request_is_strict(extra):
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": MSG, **extra})


def test_completion_and_native_requests():
    assert CompletionRequest.model_validate({"prompt": ["only one"]}).prompt_value() == "only one"
    assert CompletionRequest.model_validate({"prompt": [[1, 2]]}).prompt_value() == [1, 2]
    assert CompletionRequest.model_validate({"prompt": [1, 2]}).prompt_value() == [1, 2]
    g = GenerateRequest.model_validate({"prompt": "x", "max_length": 12})
    assert g.requested_max_tokens == 12
    both = GenerateRequest.model_validate({"prompt": "x", "max_length": 12, "max_new_tokens": 3})
    assert both.requested_max_tokens == 3
    llama = LlamaCompletionRequest.model_validate({"prompt": "x", "seed": -1, "repeat_penalty": 1.2, "top_k": 0})
    p = llama.sampling(5)
    assert (p.seed, p.repetition_penalty, p.top_k, p.temperature) == (None, 1.2, 0, 0.8)
    assert llama.requested_max_tokens is None


def test_validation_errors_name_the_parameter():
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}, {"role": "bad"}]})
    errors = [{**err, "loc": ("body", *err["loc"])} for err in e.value.errors()]
    api = describe_validation(errors)
    assert api.status == 400 and api.param == "messages[1].role" and "messages[1].role" in api.message


# -- auth -------------------------------------------------------------------------------------------
class _NoRedis:
    def register_script(self, _src):
        return None


def test_api_key_auth():
    open_gw = Admission(_NoRedis(), "", 0, 10)  # type: ignore[arg-type]
    assert open_gw.authenticate(None, "1.2.3.4") == "ip:1.2.3.4"
    adm = Admission(_NoRedis(), "alpha, beta", 1, 10)  # type: ignore[arg-type]
    a, b = adm.authenticate("Bearer alpha", "x"), adm.authenticate("bearer beta", "x")
    assert a != b and a.startswith("key:") and "alpha" not in a
    for bad in (None, "", "Bearer", "Bearer alph", "Basic alpha", "alpha"):
        with pytest.raises(APIError) as e:
            adm.authenticate(bad, "x")
        assert e.value.status == 401
    release = adm.acquire(a)
    with pytest.raises(APIError) as e:
        adm.acquire(a)
    assert e.value.status == 429 and e.value.headers["Retry-After"]
    release()
    release()  # idempotent
    adm.acquire(a)()
    assert adm.in_flight(a) == 0


# -- tokenization -----------------------------------------------------------------------------------
def test_tokenizer_cache_matches_transformers(tiny_artifacts):
    from transformers import AutoTokenizer

    async def go():
        cache = TokenizerCache(ArtifactStore(tiny_artifacts))
        try:
            tok = await cache.get("tiny-llama")
            assert tok is await cache.get("tiny-llama")  # cached
            with pytest.raises(APIError) as e:
                await cache.get("no-such-model")
            assert e.value.status == 404
            with pytest.raises(APIError):
                await cache.lookup("../tiny-llama")
            return tok
        finally:
            cache.close()

    tok = asyncio.run(go())
    ref = AutoTokenizer.from_pretrained(tiny_artifacts / "tiny-llama")
    messages = [{"role": "user", "content": "To be, or not"}]
    assert tok.encode_chat(messages) == list(ref.apply_chat_template(messages, add_generation_prompt=True,
                                                                     tokenize=True, return_dict=True)["input_ids"])
    assert tok.encode_prompt("To be") == ref("To be")["input_ids"]
    assert tok.context_length == 512 and tok.vocab_size == len(ref)
    assert fallback_chat_prompt(messages).endswith("user: To be, or not\nassistant:")


def test_minus_infinite_and_nan_logprobs_survive_the_wire() -> None:
    """A filtered-out alternative has logprob -inf; JSON has no -inf, so the message floors it and the
    batch decodes on the gateway side (it used to arrive as null and fail validation)."""
    lp = TokenLogprob(token_id=1, token="a", logprob=float("-inf"), top=[(2, "b", float("nan")), (3, "c", -0.5)])
    batch = EventBatch(events=[TokenEvent(request_id="r", seq=0, token_ids=[1], logprobs=[lp])])
    got = EventBatch.decode(batch.encode()).events[0].logprobs[0]
    assert got.logprob == -9999.0
    assert got.top == [(2, "b", -9999.0), (3, "c", -0.5)]
