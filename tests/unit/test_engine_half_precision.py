"""The paged engine in bfloat16 (the CPU default where the CPU has native bf16: AVX512-BF16/AMX) and
float16 (``DTYPE=float16``; the CUDA fallback where bf16 is missing).

Token-for-token equality with ``generate`` is the float32 check (``test_engine_paged``). In bf16 two
correct implementations round differently and part ways at the first near-tie, so here every token
the engine picks greedily must be a near-argmax of a float32 reference fed the same history
(``greedy_margins``), in a staggered mixed batch with chunked prefill and prefix sharing. Random
tokens in the same positions are far below the argmax, which shows the check can fail.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from tests.unit.test_engine_helpers import greedy, greedy_margins, prompts_for
from tests.unit.test_engine_paged import ARCHS, run_staggered
from worker.engine.api import EngineRequest
from worker.engine.loader import load_model
from worker.engine.paged_engine import PagedEngine

# bf16 keeps 8 bits of mantissa: logits of these models differ from float32 by a few hundredths.
MARGIN = 0.15


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ARCHS)
def test_half_precision_greedy_tokens_are_float32_argmaxes(tiny_artifacts, name: str, dtype: str) -> None:
    model, tok = load_model(tiny_artifacts / name, "cpu", dtype)
    ref, _ = load_model(tiny_artifacts / name, "cpu", "float32")
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    shared = prompts_for(tok, 1, seed=21, min_len=20, max_len=20)[0]
    prompts = [shared + p for p in prompts_for(tok, 3, seed=22, min_len=1, max_len=30)]
    prompts += prompts_for(tok, 3, seed=23, min_len=2, max_len=60)
    lengths = [20, 8, 16, 24, 4, 12]
    engine = PagedEngine(model, tok, max_batch=4, max_num_batched_tokens=24, block_size=4, num_blocks=256)
    reqs = [EngineRequest(f"r{i}", p, greedy(n, ignore_eos=True))
            for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))]
    got = run_staggered(engine, reqs, every=2)
    assert engine.stats().prefix_cache_hits > 0
    g = torch.Generator().manual_seed(0)
    random_margins: list[float] = []
    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        tokens = got[f"r{i}"].tokens
        assert len(tokens) == n
        margins = greedy_margins(ref, p, tokens)
        assert max(margins) <= MARGIN, f"request {i}: token {margins.index(max(margins))} is {max(margins):.3f} " \
                                       "below the float32 argmax"
        random_margins += greedy_margins(ref, p, torch.randint(5, len(tok), (n,), generator=g).tolist())
    assert statistics.median(random_margins) > 4 * MARGIN
