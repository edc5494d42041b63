"""oneDNN-packed linear layers: same numbers as ``F.linear`` (to float32 or bf16 rounding), every linear of
Llama- and GPT-2-family models swapped, and the model's logits unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from worker.engine.cpu_linear import PackedLinear, can_pack, maybe_pack
from worker.engine.loader import cpu_has_fast_bf16, load_model

pytestmark = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.float32), reason="no oneDNN in this torch")


@pytest.mark.parametrize("rows", [1, 3, 32, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(rows: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    x = torch.randn(1, rows, 80, generator=g)
    got = PackedLinear(w, b)(x)
    assert got.shape == (1, rows, 96)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_non_contiguous_input_is_accepted() -> None:
    w = torch.randn(16, 8)
    x = torch.randn(8, 5).t()  # [5, 8], not contiguous
    torch.testing.assert_close(PackedLinear(w, None)(x), F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_whole_model_packed_gives_the_same_logits(tiny_artifacts, name: str) -> None:
    model, _ = load_model(tiny_artifacts / name, "cpu", "float32")
    ref, _ = load_model(tiny_artifacts / name, "cpu", "float32")
    ids = torch.arange(3, 40).unsqueeze(0)
    assert maybe_pack(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    assert linears == []  # every projection and the LM head were swapped
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) > 0
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert maybe_pack(model)  # packing twice is a no-op


def test_not_packed_when_disabled_or_float16(tiny_artifacts) -> None:
    model, _ = load_model(tiny_artifacts / "tiny-llama", "cpu", "float32")
    assert not maybe_pack(model, enabled=False)
    half, _ = load_model(tiny_artifacts / "tiny-llama", "cpu", "float16")
    assert not maybe_pack(half)
    assert not any(isinstance(m, PackedLinear) for m in [*model.modules(), *half.modules()])


def test_bfloat16_packed_only_where_the_cpu_has_native_bf16(tiny_artifacts) -> None:
    model, _ = load_model(tiny_artifacts / "tiny-llama", "cpu", "bfloat16")
    ref, _ = load_model(tiny_artifacts / "tiny-llama", "cpu", "bfloat16")
    assert maybe_pack(model) == cpu_has_fast_bf16()
    if not cpu_has_fast_bf16():
        return
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.inference_mode():  # bf16 rounding: another summation order moves logits by ~1e-2
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0.05, atol=0.05)


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="no native bf16 on this CPU")
@pytest.mark.parametrize("rows", [1, 32])
def test_bfloat16_packed_linear_matches_f_linear(rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(96, 80, generator=g).bfloat16(), torch.randn(96, generator=g).bfloat16()
    x = torch.randn(rows, 80, generator=g).bfloat16()
    got = PackedLinear(w, b)(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), F.linear(x.float(), w.float(), b.float()), rtol=0.02, atol=0.1)
