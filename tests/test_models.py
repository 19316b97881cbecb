"""Model loading: tiny-llama needs nothing; the default LLM comes from the cache after setup."""

import pytest
import torch

from legokit.models import linear_modules, load_model, param_bytes, tiny_llama
from legokit.utils import LegokitError


def test_tiny_llama_is_seeded_gqa_llama():
    m1, tok = load_model("tiny-llama", device="cpu")
    m2, _ = tiny_llama()
    assert m1.config.num_key_value_heads < m1.config.num_attention_heads  # grouped-query attention
    assert m1.config.num_hidden_layers == 2
    for (n1, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n1
    assert next(m1.parameters()).dtype == torch.float32
    assert not m1.training


def test_tiny_tokenizer_round_trips_and_has_chat_template():
    _, tok = load_model("tiny-llama")
    text = "Héllo, wörld! 42"
    assert tok.decode(tok(text)["input_ids"]) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tok.pad_token == tok.eos_token == "<|im_end|>"


def test_linear_modules_names_every_projection():
    model, _ = load_model("tiny-llama", device="cpu")
    names = list(linear_modules(model))
    assert len(names) == 2 * 7
    assert names[0] == "model.layers.0.self_attn.q_proj"
    assert "lm_head" not in names
    expected = sum(t.numel() * 4 for t in list(model.parameters()) + list(model.buffers()))
    assert param_bytes(model) == expected  # tied embeddings counted once by parameters() already


def test_unknown_model_names_the_choices(tmp_path):
    with pytest.raises(LegokitError, match="unknown model 'gpt-17'.*smollm2-135m-instruct"):
        load_model("gpt-17")
    with pytest.raises(LegokitError, match="no config.json"):
        load_model(str(tmp_path))


def test_missing_cached_model_says_run_setup(monkeypatch, tmp_path):
    monkeypatch.setenv("LEGOKIT_CACHE", str(tmp_path))
    with pytest.raises(LegokitError, match="legokit setup"):
        load_model("smollm2-135m-instruct")


def test_local_checkpoint_directory_loads(tmp_path):
    model, tok = tiny_llama()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    back, _ = load_model(str(tmp_path))
    ids = torch.tensor([[1, 5, 9, 30]])
    torch.testing.assert_close(back(ids).logits, model(ids).logits)


@pytest.mark.slow
def test_default_llm_loads_from_the_cache_and_knows_paris():
    # load speed (a safetensors load, not a GGUF dequantisation) is measured in bench/, not asserted here
    model, tok = load_model()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert next(model.parameters()).dtype == torch.float32
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
