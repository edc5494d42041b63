"""SimpleEngine and EchoEngine against model.generate and the engine contract; the loader."""

from __future__ import annotations

import pytest
import torch

from protocol.messages import SamplingParams
from tests.unit.test_engine_helpers import greedy, hf_greedy, prompts_for, run_to_completion
from worker.engine.api import EngineRequest
from worker.engine.echo_engine import EchoEngine
from worker.engine.loader import load_engine, load_model, parse_bytes, resolve_dtype
from worker.engine.simple_engine import SimpleEngine


@pytest.fixture(scope="module")
def llama(tiny_artifacts):
    return load_model(tiny_artifacts / "tiny-llama", "cpu", "float32")


@pytest.fixture(scope="module")
def gpt2(tiny_artifacts):
    return load_model(tiny_artifacts / "tiny-gpt2", "cpu", "float32")


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_simple_greedy_equals_generate(which: str, request) -> None:
    model, tok = request.getfixturevalue(which)
    engine = SimpleEngine(model, tok, max_batch=3)
    prompts = prompts_for(tok, 5, seed=1)
    got = run_to_completion(engine, [EngineRequest(f"r{i}", p, greedy(20)) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        assert got[f"r{i}"].tokens == hf_greedy(model, p, 20), f"request {i}"
        assert got[f"r{i}"].finish_reason in ("length", "stop")
    assert not engine.running and not engine.has_work()


def test_simple_stops_cancel_resume(llama) -> None:
    model, tok = llama
    prompt = prompts_for(tok, 1, seed=2)[0]
    ref = hf_greedy(model, prompt, 12)
    engine = SimpleEngine(model, tok)
    # stop token id: the 4th generated token stops it (and is the last id reported)
    got = run_to_completion(engine, [EngineRequest("s", prompt, greedy(12, stop_token_ids=[ref[3]]))])
    assert got["s"].tokens == ref[: ref.index(ref[3]) + 1] and got["s"].finish_reason == "stop"
    # resume: continue after the first 5 tokens, counting them
    got = run_to_completion(engine, [EngineRequest("r", prompt, greedy(12), resume_token_ids=ref[:5])])
    assert got["r"].tokens == ref[5:12] and got["r"].outputs[-1].num_generated_tokens == 12
    # cancellation: one final output, nothing after
    engine.add_request(EngineRequest("c", prompt, greedy(100)))
    engine.step()
    engine.cancel("c")
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("c", "cancelled")]
    assert not engine.has_work()


def test_simple_errors_and_context_end(llama) -> None:
    model, tok = llama
    engine = SimpleEngine(model, tok, max_model_len=20)
    got = run_to_completion(engine, [
        EngineRequest("long", list(range(5, 30)), greedy(4)),
        EngineRequest("empty", [], greedy(4)),
        EngineRequest("ctx", list(range(5, 15)), greedy(100, ignore_eos=True)),
    ])
    assert got["long"].finish_reason == "error" and got["long"].outputs[0].error
    assert got["empty"].finish_reason == "error"
    assert got["ctx"].finish_reason == "length" and len(got["ctx"].tokens) == 10


def test_simple_stop_string_and_seeded_sampling(llama) -> None:
    model, tok = llama
    prompt = prompts_for(tok, 1, seed=3)[0]
    engine = SimpleEngine(model, tok)
    free = run_to_completion(engine, [EngineRequest("a", prompt, greedy(16, ignore_eos=True))])["a"]
    stop = free.text[4:7]
    assert stop
    got = run_to_completion(engine, [EngineRequest("b", prompt, greedy(16, stop=[stop], ignore_eos=True))])["b"]
    assert got.finish_reason == "stop" and got.text == free.text[: free.text.index(stop)]
    assert got.outputs[-1].stop_reason == stop  # which stop string ended it
    assert all(o.stop_reason is None for o in free.outputs)
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    one = run_to_completion(engine, [EngineRequest("x", prompt, params)])["x"].tokens
    both = run_to_completion(engine, [EngineRequest("y", prompt, params),
                                      EngineRequest("z", prompt[:5], SamplingParams(max_tokens=10))])
    assert both["y"].tokens == one


def test_echo_engine(tiny_artifacts) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_artifacts / "tiny-llama")
    engine = EchoEngine(tok, step_delay=0.0)
    got = run_to_completion(engine, [EngineRequest("e", [10, 11, 12], SamplingParams(max_tokens=7))])
    assert got["e"].tokens == [10, 11, 12, 10, 11, 12, 10] and got["e"].finish_reason == "length"
    assert got["e"].text == tok.decode([10, 11, 12, 10, 11, 12, 10])


def test_loader(tiny_artifacts) -> None:
    engine = load_engine("simple", tiny_artifacts / "tiny-gpt2", "cpu", "float32")
    assert isinstance(engine, SimpleEngine) and engine.max_model_len == 512
    assert isinstance(load_engine("echo", tiny_artifacts / "tiny-gpt2"), EchoEngine)
    with pytest.raises(ValueError):
        load_engine("nope", tiny_artifacts / "tiny-gpt2")
    assert parse_bytes("512MiB") == 512 * 1024**2 and parse_bytes("1.5GB") == 1_500_000_000
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype("auto", "cpu") in (torch.bfloat16, torch.float32)


def test_engine_thread_delivers_outputs_and_cancels(tiny_artifacts) -> None:
    import threading

    from transformers import AutoTokenizer

    from worker.engine.engine_thread import EngineThread

    tok = AutoTokenizer.from_pretrained(tiny_artifacts / "tiny-llama")
    finished: dict[str, str] = {}
    done = threading.Event()

    def on_outputs(outputs) -> None:
        for o in outputs:
            if o.finish_reason:
                finished[o.request_id] = o.finish_reason
        if len(finished) == 3:
            done.set()

    thread = EngineThread(EchoEngine(tok, step_delay=0.001), on_outputs).start()
    try:
        thread.add_request(EngineRequest("a", [5, 6], SamplingParams(max_tokens=3)))
        thread.add_request(EngineRequest("b", [7], SamplingParams(max_tokens=5)))
        thread.add_request(EngineRequest("c", [8], SamplingParams(max_tokens=100_000)))
        thread.cancel("c")
        assert done.wait(30)
        assert finished == {"a": "length", "b": "length", "c": "cancelled"}
    finally:
        thread.stop()
    assert not thread.alive


def test_engine_thread_builds_its_engine_on_its_own_thread(tiny_artifacts):
    """All of a model's torch work on one thread (one OpenMP team; see engine_thread.py): the build
    function runs on the engine thread, and a failing build is re-raised by wait_ready()."""
    import threading

    from transformers import AutoTokenizer

    from worker.engine.echo_engine import EchoEngine
    from worker.engine.engine_thread import EngineThread

    tok = AutoTokenizer.from_pretrained(tiny_artifacts / "tiny-llama")
    built_on: list[str] = []

    def build() -> EchoEngine:
        built_on.append(threading.current_thread().name)
        return EchoEngine(tok, step_delay=0.001)

    thread = EngineThread.launch(build, name="engine-under-test")
    try:
        engine = thread.wait_ready(30)
        assert isinstance(engine, EchoEngine) and built_on == ["engine-under-test"]
        done = threading.Event()
        thread.on_outputs = lambda outs: done.set() if any(o.finish_reason for o in outs) else None
        thread.add_request(EngineRequest("a", [5, 6], SamplingParams(max_tokens=3)))
        assert done.wait(30)
    finally:
        thread.stop()

    def broken() -> EchoEngine:
        raise LookupError("no such model")

    failed = EngineThread.launch(broken)
    with pytest.raises(LookupError, match="no such model"):
        failed.wait_ready(30)
    failed.stop()
    assert not failed.alive
