"""Sampler: greedy exactness, filters, penalties, per-request seeds, logprobs."""

from __future__ import annotations

import math

import torch

from protocol.messages import SamplingParams
from worker.engine.sampler import Sampler, SampleRow, advance_generator, make_generator

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def rows_of(n: int, **params) -> list[SampleRow]:
    return [SampleRow(SamplingParams(**params)) for _ in range(n)]


def test_greedy_is_argmax() -> None:
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    out = Sampler(seed=0)(logits, rows_of(8, temperature=0.0))
    assert [s.token_id for s in out] == logits.argmax(-1).tolist()
    out = Sampler(seed=0)(logits, rows_of(8, temperature=0.7, top_k=1))
    assert [s.token_id for s in out] == logits.argmax(-1).tolist()


def test_sampling_follows_the_distribution() -> None:
    n = 6000
    out = Sampler(seed=1)(LOGITS.repeat(n, 1), rows_of(n, temperature=1.0))
    freq = torch.bincount(torch.tensor([s.token_id for s in out]), minlength=4).float() / n
    assert torch.allclose(freq, PROBS, atol=0.03)


def test_low_temperature_sharpens() -> None:
    n = 2000
    out = Sampler(seed=2)(LOGITS.repeat(n, 1), rows_of(n, temperature=0.1))
    assert sum(s.token_id == 0 for s in out) > 0.98 * n


def sampled_set(n: int = 2000, **params) -> set[int]:
    return {s.token_id for s in Sampler(seed=3)(LOGITS.repeat(n, 1), rows_of(n, **params))}


def test_top_k_top_p_min_p() -> None:
    assert sampled_set(top_k=2) == {0, 1}
    assert sampled_set(top_p=0.6) == {0, 1}
    assert sampled_set(top_p=0.5) == {0}
    assert sampled_set(top_p=0.81) == {0, 1, 2}
    assert sampled_set(min_p=0.5) == {0, 1}  # p >= 0.25
    assert sampled_set(min_p=0.2) == {0, 1, 2}


def test_mixed_parameters_in_one_batch() -> None:
    rows = [SampleRow(SamplingParams(temperature=0.0)), SampleRow(SamplingParams(top_k=2)),
            SampleRow(SamplingParams(top_p=0.5)), SampleRow(SamplingParams(min_p=0.5))] * 300
    out = Sampler(seed=4)(LOGITS.repeat(len(rows), 1), rows)
    for row, s in zip(rows, out, strict=True):
        allowed = {0} if row.params.greedy or row.params.top_p == 0.5 else {0, 1}
        assert s.token_id in allowed


def test_repetition_penalty_hf_semantics() -> None:
    logits = torch.tensor([[2.0, 1.5, -1.0, -3.0]])
    row = SampleRow(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt_ids=[0, 2])
    assert Sampler()(logits, [row])[0].token_id == 1  # 2.0 / 2 = 1.0 < 1.5
    row = SampleRow(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt_ids=[])
    assert Sampler()(logits, [row])[0].token_id == 0


def test_presence_and_frequency_penalties_count_output_only() -> None:
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0]])
    freq = SampleRow(SamplingParams(temperature=0.0, frequency_penalty=0.3), prompt_ids=[1, 1, 1],
                     output_ids=[0, 0])
    assert Sampler()(logits, [freq])[0].token_id == 1  # 2.0 - 0.6 = 1.4 < 1.5
    pres = SampleRow(SamplingParams(temperature=0.0, presence_penalty=1.2), output_ids=[0, 0, 0, 1])
    assert Sampler()(logits, [pres])[0].token_id == 2  # 0.8, 0.3, 1.0


def test_seeded_request_ignores_batch_mates() -> None:
    vocab = 300
    logits = torch.randn(40, vocab, generator=torch.Generator().manual_seed(5))

    def run(batch_rows: int, mate_seed: int) -> list[int]:
        sampler = Sampler(seed=mate_seed)
        mine = SampleRow(SamplingParams(temperature=1.0, top_p=0.9, seed=1234), make_generator(1234))
        mates = [SampleRow(SamplingParams(temperature=0.8, seed=mate_seed + i), make_generator(mate_seed + i))
                 if i % 2 else SampleRow(SamplingParams(temperature=1.2)) for i in range(batch_rows)]
        tokens = []
        for step in range(40):
            rows = [*mates[: batch_rows // 2], mine, *mates[batch_rows // 2:]]
            batch = logits[step].repeat(len(rows), 1)
            tokens.append(sampler(batch, rows)[batch_rows // 2].token_id)
        return tokens

    alone = run(0, 7)
    assert run(5, 8) == alone
    assert run(12, 9) == alone


def test_advance_generator_resumes_the_same_stream() -> None:
    vocab = 50
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(6))
    params = SamplingParams(temperature=1.0, seed=99)
    gen = make_generator(99)
    full = [Sampler()(logits[i:i + 1], [SampleRow(params, gen)])[0].token_id for i in range(6)]
    gen2 = make_generator(99)
    advance_generator(gen2, vocab, 3, "cpu")
    tail = [Sampler()(logits[i:i + 1], [SampleRow(params, gen2)])[0].token_id for i in range(3, 6)]
    assert tail == full[3:]


def test_logprobs_are_of_the_raw_distribution() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.5, -2.0], [0.0, 0.0, 0.0, 5.0]])
    rows = [SampleRow(SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=1.5), prompt_ids=[0]),
            SampleRow(SamplingParams(temperature=0.0))]
    out = Sampler()(logits, rows)
    lp = torch.log_softmax(logits[0], -1)
    assert out[0].token_id == 0
    assert math.isclose(out[0].logprob, lp[0].item(), rel_tol=1e-5)
    assert [t for t, _ in out[0].top] == [0, 1]
    assert math.isclose(out[0].top[1][1], lp[1].item(), rel_tol=1e-5)
    assert out[1].logprob is None and out[1].top is None
    zero = Sampler()(logits[:1], [SampleRow(SamplingParams(temperature=0.0, logprobs=0))])[0]
    assert zero.logprob is not None and zero.top == []
