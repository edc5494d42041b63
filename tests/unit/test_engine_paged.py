"""PagedEngine correctness: token-for-token equal to ``model.generate`` under continuous batching,
chunked prefill, preemption and prefix sharing; seeds; cancellation; no block leaks."""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.messages import SamplingParams
from tests.unit.test_engine_helpers import Collected, collect, greedy, hf_greedy, prompts_for, run_to_completion
from worker.engine.api import EngineRequest
from worker.engine.loader import load_model
from worker.engine.paged_engine import PagedEngine
from worker.engine.simple_engine import SimpleEngine

ARCHS = ["tiny-llama", "tiny-gpt2", "tiny-qwen2"]


@pytest.fixture(scope="module")
def models(tiny_artifacts):
    """name -> (engine's model, reference model, tokenizer); the engine gets its own copy."""
    out = {}
    for name in ARCHS:
        model, tok = load_model(tiny_artifacts / name, "cpu", "float32")
        ref, _ = load_model(tiny_artifacts / name, "cpu", "float32")
        out[name] = (model, ref, tok)
    return out


_REF_CACHE: dict[tuple, list[int]] = {}


def reference(ref_model, name: str, prompt: list[int], n: int) -> list[int]:
    key = (name, tuple(prompt), n)
    if key not in _REF_CACHE:
        _REF_CACHE[key] = hf_greedy(ref_model, prompt, n)
    return _REF_CACHE[key]


def make_engine(model, tok, **kw) -> PagedEngine:
    kw.setdefault("block_size", 4)
    kw.setdefault("num_blocks", 256)
    return PagedEngine(model, tok, **kw)


def run_staggered(engine: PagedEngine, requests: list[EngineRequest], every: int = 2) -> dict[str, Collected]:
    """Add one request every ``every`` steps while stepping, then drain; check invariants throughout."""
    got: dict[str, Collected] = defaultdict(Collected)
    pending = list(requests)
    step = 0
    while pending or engine.has_work():
        if pending and step % every == 0:
            engine.add_request(pending.pop(0))
        collect(got, engine.step())
        engine.check_invariants()
        step += 1
        assert step < 5000
    assert engine.block_manager.num_used == 0
    return dict(got)


@pytest.mark.parametrize("name", ARCHS)
def test_staggered_mixed_batch_equals_generate(models, name: str) -> None:
    model, ref, tok = models[name]
    prompts = prompts_for(tok, 8, seed=11, min_len=2, max_len=70)
    lengths = [5, 30, 12, 25, 1, 18, 30, 9]
    # small blocks and budget: chunked prefills run beside decodes
    engine = make_engine(model, tok, max_batch=5, max_num_batched_tokens=24)
    reqs = [EngineRequest(f"r{i}", p, greedy(n)) for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))]
    got = run_staggered(engine, reqs, every=3)
    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        assert got[f"r{i}"].tokens == reference(ref, name, p, n), f"request {i}"


def test_preemption_gives_the_same_tokens(models) -> None:
    model, ref, tok = models["tiny-llama"]
    prompts = prompts_for(tok, 4, seed=12, min_len=10, max_len=24)
    # 16 blocks of 4 tokens = 64 token slots for 4 requests of up to 24 + 24 tokens: must preempt
    engine = make_engine(model, tok, max_batch=4, num_blocks=16, max_num_batched_tokens=64)
    reqs = [EngineRequest(f"p{i}", p, greedy(24, ignore_eos=True)) for i, p in enumerate(prompts)]
    got = run_staggered(engine, reqs, every=1)
    assert engine.stats().preemptions > 0
    for i, p in enumerate(prompts):
        want = hf_greedy_no_eos(ref, p, 24, tok)
        assert got[f"p{i}"].tokens == want, f"request {i}"


def hf_greedy_no_eos(ref, prompt: list[int], n: int, tok) -> list[int]:
    """Reference with EOS ignored: the simple engine, itself tested against ``generate``."""
    engine = SimpleEngine(ref, tok)
    return run_to_completion(engine, [EngineRequest("x", prompt, greedy(n, ignore_eos=True))])["x"].tokens


def test_prefix_sharing_gives_the_same_tokens(models) -> None:
    model, ref, tok = models["tiny-llama"]
    system = prompts_for(tok, 1, seed=13, min_len=37, max_len=37)[0]
    tails = prompts_for(tok, 4, seed=14, min_len=1, max_len=9)
    engine = make_engine(model, tok, max_batch=4)
    first = run_to_completion(engine, [EngineRequest("first", system + tails[0], greedy(10))])
    reqs = [EngineRequest(f"s{i}", system + t, greedy(10)) for i, t in enumerate(tails)]
    got = run_staggered(engine, reqs, every=2)
    stats = engine.stats()
    assert stats.prefix_cache_hits >= 4 * 36  # every request found the 9 full blocks of the system prompt
    assert got["s0"].tokens == first["first"].tokens
    for i, t in enumerate(tails):
        assert got[f"s{i}"].tokens == reference(ref, "tiny-llama", system + t, 10)


def test_requests_arriving_together_with_one_prompt_compute_it_once(models) -> None:
    """``n`` choices (or a burst with one system prompt) arrive in one step: the first computes the
    prompt, the others wait for its blocks and take them from the cache; tokens are unchanged."""
    model, ref, tok = models["tiny-llama"]
    prompt = prompts_for(tok, 1, seed=31, min_len=37, max_len=37)[0]  # 9 full blocks of 4 + 1 token
    engine = make_engine(model, tok, max_batch=4, max_num_batched_tokens=16)  # the prompt takes 3 steps
    reqs = [EngineRequest(f"c{i}", prompt, greedy(6, ignore_eos=True)) for i in range(4)]
    got = run_to_completion(engine, reqs)
    assert engine.stats().prefix_cache_hits == 3 * 36
    want = hf_greedy_no_eos(ref, prompt, 6, tok)
    assert all(got[f"c{i}"].tokens == want for i in range(4))
    # without prefix caching every request computes the whole prompt, with the same tokens
    plain = make_engine(model, tok, max_batch=4, max_num_batched_tokens=16, enable_prefix_caching=False)
    assert {k: v.tokens for k, v in run_to_completion(plain, reqs).items()} == {k: v.tokens for k, v in got.items()}
    assert plain.stats().prefix_cache_hits == 0


def test_preempted_sequence_recomputes_from_its_cached_blocks(models) -> None:
    model, _, tok = models["tiny-llama"]
    prompts = prompts_for(tok, 4, seed=15, min_len=20, max_len=20)
    engine = make_engine(model, tok, max_batch=4, num_blocks=20)
    reqs = [EngineRequest(f"q{i}", p, greedy(30, ignore_eos=True)) for i, p in enumerate(prompts)]
    with_cache = run_staggered(engine, reqs, every=1)
    engine2 = make_engine(model, tok, max_batch=4, num_blocks=20, enable_prefix_caching=False)
    without = run_staggered(engine2, reqs, every=1)
    assert engine.stats().preemptions > 0 and engine2.stats().preemptions > 0
    assert {k: v.tokens for k, v in with_cache.items()} == {k: v.tokens for k, v in without.items()}


def test_seeded_sampling_is_independent_of_batch_mates(models) -> None:
    model, _, tok = models["tiny-qwen2"]
    prompt = prompts_for(tok, 1, seed=16)[0]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=4321, max_tokens=25, ignore_eos=True)
    alone = run_to_completion(make_engine(model, tok), [EngineRequest("me", prompt, params)])["me"].tokens
    mates = [EngineRequest(f"m{i}", p, SamplingParams(temperature=1.0, max_tokens=20 + i))
             for i, p in enumerate(prompts_for(tok, 5, seed=17))]
    crowd = run_staggered(make_engine(model, tok, max_batch=6, max_num_batched_tokens=16),
                          [*mates[:3], EngineRequest("me", prompt, params), *mates[3:]], every=2)
    assert crowd["me"].tokens == alone
    # and the simple engine (separate cache, one sequence per forward) agrees
    simple = run_to_completion(SimpleEngine(models["tiny-qwen2"][1], tok), [EngineRequest("me", prompt, params)])
    assert simple["me"].tokens == alone


def test_outputs_match_simple_engine_for_stops_and_logprobs(models) -> None:
    model, ref, tok = models["tiny-gpt2"]
    prompts = prompts_for(tok, 3, seed=18)
    free = run_to_completion(SimpleEngine(ref, tok), [EngineRequest("f", prompts[0], greedy(20, ignore_eos=True))])
    stop = free["f"].text[3:6]
    reqs = [
        EngineRequest("stopstr", prompts[0], greedy(20, stop=[stop], ignore_eos=True)),
        EngineRequest("stopid", prompts[1], greedy(20, stop_token_ids=[free["f"].tokens[4]], ignore_eos=True)),
        EngineRequest("lp", prompts[2], greedy(6, logprobs=3)),
        EngineRequest("resume", prompts[0], greedy(12, ignore_eos=True), resume_token_ids=free["f"].tokens[:4]),
    ]
    paged = run_to_completion(make_engine(model, tok), reqs)
    simple = run_to_completion(SimpleEngine(ref, tok), reqs)
    for rid in ("stopstr", "stopid", "lp", "resume"):
        assert paged[rid].tokens == simple[rid].tokens, rid
        assert paged[rid].text == simple[rid].text, rid
        assert paged[rid].finish_reason == simple[rid].finish_reason, rid
    assert paged["stopstr"].finish_reason == "stop" and stop not in paged["stopstr"].text
    assert paged["resume"].tokens == free["f"].tokens[4:12]
    lps = [lp for o in paged["lp"].outputs for lp in (o.logprobs or [])]
    assert len(lps) == 6 and all(len(lp.top) == 3 for lp in lps)


def test_cancel_frees_blocks_before_next_step(models) -> None:
    model, _, tok = models["tiny-llama"]
    engine = make_engine(model, tok)
    engine.add_request(EngineRequest("a", prompts_for(tok, 1, seed=19, min_len=30, max_len=30)[0], greedy(50)))
    engine.add_request(EngineRequest("b", prompts_for(tok, 1, seed=20)[0], greedy(50)))
    engine.step()
    engine.step()
    used = engine.stats().kv_blocks_used
    engine.cancel("a")
    outs = engine.step()
    assert ("a", "cancelled") in [(o.request_id, o.finish_reason) for o in outs]
    assert engine.stats().kv_blocks_used < used
    engine.check_invariants()
    engine.cancel("b")
    engine.cancel("never-existed")
    engine.step()
    assert engine.stats().kv_blocks_used == 0 and not engine.has_work()


def test_errors_too_long_and_context_end(models) -> None:
    model, _, tok = models["tiny-llama"]
    engine = make_engine(model, tok, num_blocks=10)  # 40 token slots: max_model_len capped to 40
    assert engine.max_model_len == 40
    got = run_to_completion(engine, [
        EngineRequest("long", list(range(5, 50)), greedy(4)),
        EngineRequest("empty", [], greedy(4)),
        EngineRequest("badid", [5, 6, 10**6], greedy(4)),
        EngineRequest("ctx", list(range(5, 35)), greedy(100, ignore_eos=True)),
    ])
    assert got["long"].finish_reason == "error" and got["empty"].finish_reason == "error"
    assert got["badid"].finish_reason == "error" and "out of range" in got["badid"].outputs[0].error
    assert got["ctx"].finish_reason == "length" and len(got["ctx"].tokens) == 10
    assert engine.block_manager.num_used == 0


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(events=st.lists(st.tuples(st.sampled_from(["add", "add", "add", "cancel", "step", "step"]),
                                 st.integers(1, 30), st.integers(1, 12)), min_size=1, max_size=40),
       num_blocks=st.integers(8, 40), prefix=st.booleans())
def test_property_block_accounting_never_leaks(models, events, num_blocks: int, prefix: bool) -> None:
    model, _, tok = models["tiny-llama"]
    engine = make_engine(model, tok, max_batch=4, num_blocks=num_blocks, max_num_batched_tokens=16,
                         enable_prefix_caching=prefix)
    shared = list(range(7, 19))
    added: list[str] = []
    finished: set[str] = set()

    def step() -> None:
        for out in engine.step():
            assert out.request_id not in finished
            if out.finish_reason:
                finished.add(out.request_id)
        engine.check_invariants()

    for kind, a, b in events:
        if kind == "add":
            rid = f"r{len(added)}"
            prompt = (shared + list(range(20, 20 + a)))[: max(1, a)] if b % 2 else list(range(30, 30 + a))
            engine.add_request(EngineRequest(rid, prompt, greedy(b, ignore_eos=True)))
            added.append(rid)
        elif kind == "cancel" and added:
            engine.cancel(added[a % len(added)])
        else:
            step()
    for _ in range(2000):
        if not engine.has_work():
            break
        step()
    assert not engine.has_work()
    assert finished == set(added)
    assert engine.block_manager.num_used == 0


@given(st.lists(st.integers(1, 40), max_size=12), st.integers(0, 6))
@settings(max_examples=150, deadline=None)
def test_decode_buckets_are_contiguous_and_optimal(lengths: list[int], cost: int) -> None:
    """The buckets cover the rows in order, and no split into contiguous buckets gathers fewer padded
    blocks plus bucket costs (checked against every split by brute force)."""
    import itertools

    from worker.engine.model_runner import decode_buckets

    lengths = sorted(lengths)
    got = decode_buckets(lengths, cost)
    assert [r for s, c in got for r in range(s, s + c)] == list(range(len(lengths)))

    def total(bounds: list[tuple[int, int]]) -> int:
        return sum(c * lengths[s + c - 1] + cost for s, c in bounds)

    n = len(lengths)
    best = 0
    if n:
        best = min(total([(a, b - a) for a, b in itertools.pairwise([0, *cuts, n])])
                   for k in range(n) for cuts in itertools.combinations(range(1, n), k))
    assert total(got) == best
