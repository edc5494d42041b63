from protocol.artifacts import ArtifactStore, verify


def test_tiny_models_are_valid_artifacts(tiny_artifacts):
    store = ArtifactStore(tiny_artifacts)
    names = {m.name for m in store.list()}
    assert {"tiny-llama", "tiny-qwen2", "tiny-gpt2"} <= names
    for name in names:
        d = store.find(name)
        assert verify(d) == []
        m = store.manifest(name)
        assert m.parameter_count > 0 and m.context_length == 512


def test_tiny_model_generates(tiny_artifacts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny_artifacts / "tiny-llama"
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    ids = tok("To be, or not", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] <= ids.shape[1] + 5
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|assistant|>\n")
