"""The optimizer on real (tiny, random) transformers models: passes, quality gates, the int8 format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.nn import functional as F

from optimizer import quality
from optimizer.__main__ import main as optimizer_cli
from optimizer.passes import GateFailed, OptimizeError, optimize
from optimizer.quant import Int8Linear, dequantize_weight, load_quantized, quantize_weight, read_state_dict
from protocol.artifacts import MANIFEST, ArtifactStore, read_manifest, verify


@pytest.fixture
def store(tmp_path: Path, tiny_artifacts: Path) -> ArtifactStore:
    """A volume holding copies of the session's tiny models, with tiny-gpt2 as a bundled model."""
    volume, bundled = tmp_path / "volume", tmp_path / "bundled"
    volume.mkdir()
    shutil.copytree(tiny_artifacts / "tiny-llama", volume / "tiny-llama")
    shutil.copytree(tiny_artifacts / "tiny-gpt2", bundled / "tiny-gpt2")
    return ArtifactStore(volume, bundled)


def test_int8_weights_and_module() -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 32) * torch.linspace(0.1, 4, 48)[:, None]
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.shape == (48,)
    assert torch.all((w - dequantize_weight(q, s)).abs() <= s[:, None] / 2 + 1e-6)
    m = Int8Linear(32, 48, bias=True)
    m.weight.copy_(q)
    m.weight_scale.copy_(s)
    m.bias.data.normal_()
    x = torch.randn(3, 5, 32)
    want = F.linear(x, dequantize_weight(q, s), m.bias)
    assert torch.allclose(m(x), want, atol=1e-4)
    m._packed_ok = False  # the generic path (used off-CPU) agrees too
    assert torch.allclose(m(x), want, atol=1e-4)
    assert m(x.bfloat16()).dtype == torch.bfloat16


def test_bf16_and_int8_pass_their_gates(store: ArtifactStore) -> None:
    seen: list[str] = []
    results = optimize(store, "tiny-llama", ["bf16", "int8"], progress=lambda **kw: seen.append(kw["stage"]))
    assert [r.output for r in results] == ["tiny-llama-bf16", "tiny-llama-int8"] and all(r.passed for r in results)
    assert seen[-1] == "ready" and "evaluating" in seen
    for r in results:
        q = r.quality
        print(f"tiny-llama {r.pass_name}: {json.dumps(q)}")
        assert q["perplexity_ratio"] <= q["max_perplexity_ratio"] and q["top1_agreement"] >= q["min_top1_agreement"]
        m = read_manifest(store.root / r.output)
        assert m.quality == q and m.parent == "tiny-llama" and m.passes == [r.pass_name]
        assert verify(store.root / r.output) == [] and m.extra["heldout"] == "builtin"
    assert read_manifest(store.root / "tiny-llama-bf16").dtype == "bfloat16"

    int8 = store.root / "tiny-llama-int8"
    m = read_manifest(int8)
    assert m.quantization == "int8" and m.size_bytes < read_manifest(store.root / "tiny-llama").size_bytes
    config = json.loads((int8 / "config.json").read_text())
    qcfg = config["quantization_config"]
    assert qcfg["quant_method"] == "spindle-int8" and "model.layers.0.self_attn.q_proj" in qcfg["modules"]
    assert "lm_head" not in qcfg["modules"]  # tied to the embedding, which stays in float
    with safe_open(str(int8 / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.int8
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight_scale").dtype == torch.float32
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32

    model = load_quantized(int8, "float32", "cpu")
    layers = [mod for mod in model.modules() if isinstance(mod, Int8Linear)]
    assert len(layers) == len(qcfg["modules"]) == 14
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # The loaded model computes exactly what the dequantized weights say.
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(store.root / "tiny-llama"))
    state = read_state_dict(int8)
    with torch.no_grad():
        for name in qcfg["modules"]:
            reference.get_submodule(name).weight.copy_(dequantize_weight(state[f"{name}.weight"],
                                                                         state[f"{name}.weight_scale"]))
        ids = torch.randint(0, 400, (1, 24))
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4)
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 28)
    assert load_quantized(int8, "bfloat16")(ids).logits.dtype == torch.bfloat16


def test_gpt2_conv1d_layers_quantize_from_a_bundled_source(store: ArtifactStore) -> None:
    (r,) = optimize(store, "tiny-gpt2", ["int8"])
    print(f"tiny-gpt2 int8: {json.dumps(r.quality)}")
    assert r.passed and (store.root / "tiny-gpt2-int8").is_dir()  # written into the volume
    model = load_quantized(store.root / "tiny-gpt2-int8")
    assert isinstance(model.transformer.h[0].attn.c_attn, Int8Linear)


def test_a_failed_gate_leaves_no_servable_artifact(store: ArtifactStore) -> None:
    strict = {"int8": quality.Gate(max_perplexity_ratio=1.0, min_top1_agreement=1.01)}
    with pytest.raises(GateFailed, match=r"int8: .*top-1 agreement") as e:
        optimize(store, "tiny-llama", ["int8"], gates=strict)
    assert not e.value.results[0].passed and e.value.results[0].quality["top1_agreement"] < 1.01
    assert not (store.root / "tiny-llama-int8").exists()
    assert list((store.root / ".tmp").iterdir()) == []
    with pytest.raises(OptimizeError, match="unknown pass"):
        optimize(store, "tiny-llama", ["int4"])
    with pytest.raises(OptimizeError, match="not in the artifact volume"):
        optimize(store, "missing", ["int8"])


def test_heldout_text_and_the_cli(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    src = store.root / "tiny-llama"
    (src / "heldout.txt").write_text("To be, or not to be, that is the question. " * 20)
    monkeypatch.setenv("ARTIFACTS_DIR", str(store.root))
    monkeypatch.setenv("BUNDLED_MODELS_DIR", str(store.bundled))
    monkeypatch.setenv("MIN_FREE_DISK_BYTES", "0")
    assert optimizer_cli(["tiny-llama", "--passes", "fp16"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["passed"] and line["output"] == "tiny-llama-fp16"
    m = read_manifest(store.root / "tiny-llama-fp16")
    assert m.extra["heldout"] == "heldout.txt" and (store.root / "tiny-llama-fp16" / "heldout.txt").is_file()
    assert m.dtype == "float16" and (store.root / "tiny-llama-fp16" / MANIFEST).is_file()
    assert optimizer_cli(["tiny-llama", "--passes", "fp16"]) == 2  # the output exists now
    assert optimizer_cli(["tiny-llama", "--passes", "int8", "--min-top1-agreement", "1.01"]) == 1
    assert not (store.root / "tiny-llama-int8").exists()


def test_the_paged_engine_serves_an_int8_artifact(store: ArtifactStore) -> None:
    """Greedy tokens from the engine on the int8 artifact equal transformers' generate on it."""
    paged = pytest.importorskip("worker.engine.paged_engine")
    from transformers import AutoTokenizer

    from protocol.messages import SamplingParams
    from worker.engine.api import EngineRequest

    optimize(store, "tiny-llama", ["int8"])
    path = store.root / "tiny-llama-int8"
    model, tok = load_quantized(path, "float32", "cpu"), AutoTokenizer.from_pretrained(str(path))
    engine = paged.PagedEngine(model, tok, max_batch=4, kv_cache_memory=16 * 1024**2)
    prompt = tok("To be, or not to be", add_special_tokens=False).input_ids
    engine.add_request(EngineRequest("r1", prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)))
    tokens: list[int] = []
    while engine.has_work():
        for out in engine.step():
            tokens += out.new_token_ids
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):]
    assert tokens == want.tolist()
