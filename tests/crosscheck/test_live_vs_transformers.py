"""Live comparison against transformers on configurations drawn afresh at every run (make crosscheck).

Unlike tests/goldens (fixed files), hypothesis draws new shapes and flags each run: heads, kv heads,
head_dim, rotary fraction, bias, qk norm, parallel residual, tying, rope scaling, activation, padding.
Tolerances (relative 2-norm error): transformers builds its RoPE cos/sin tables in float32 even for a
float64 model, which alone moves random configurations by up to ~1e-7 (seen: 1.1e-7 with 3 layers of
std-0.2 weights). So each case is checked twice: with our tables built the same way (float32), every
other step float64 on both sides, the outputs must agree to 1e-7 (torch and NumPy may still round a
float32 pow or cos differently by an ulp: seen 2e-9 typically, 3.2e-8 at worst with 2 rotary dims);
with our own float64 tables, to 1e-6.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="make crosscheck installs torch (CPU) and transformers")
transformers = pytest.importorskip("transformers", reason="make crosscheck installs torch (CPU) and transformers")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stablelm_ref import StableLmForCausalLM


def rel(a, b, where):
    a, b = np.asarray(a, np.float64)[where], np.asarray(b, np.float64)[where]
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@st.composite
def configs(draw):
    kv = draw(st.sampled_from([1, 2, 4]))
    heads = kv * draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([8, 16, 20, 32]))
    factor = draw(st.sampled_from([0.25, 0.5, 1.0]))
    if int(head_dim * factor) % 2:
        factor = 0.5
    rope = {"rope_type": "default", "rope_theta": draw(st.sampled_from([10000.0, 500000.0])),
            "partial_rotary_factor": factor}
    scaling = draw(st.sampled_from([None, "linear", "dynamic"]))
    if scaling == "dynamic" and int(head_dim * factor) <= 2:
        factor = 0.5          # dynamic NTK needs > 2 rotary dims (exponent d / (d - 2)): both sides refuse it
    if scaling:
        rope.update(rope_type=scaling, factor=draw(st.sampled_from([2.0, 4.0])))
    return transformers.StableLmConfig(
        vocab_size=draw(st.integers(40, 200)), hidden_size=heads * head_dim,
        intermediate_size=draw(st.integers(16, 128)), num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
        use_qkv_bias=draw(st.booleans()), qk_layernorm=draw(st.booleans()),
        use_parallel_residual=draw(st.booleans()), tie_word_embeddings=draw(st.booleans()),
        hidden_act=draw(st.sampled_from(["silu", "gelu", "gelu_new"])),
        layer_norm_eps=draw(st.sampled_from([1e-5, 1e-3])), rope_parameters=rope, pad_token_id=0)


def random_model(config, seed):
    torch.manual_seed(seed)
    model = transformers.StableLmForCausalLM(config).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((0.2 * torch.randn_like(p) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
                    .float().double())
    return model


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)     # the same examples on every CI run
@given(config=configs(), seed=st.integers(0, 2**16), t=st.integers(1, 12), pad=st.integers(0, 4))
def test_random_configs_match_transformers(tmp_path_factory, monkeypatch, config, seed, t, pad):
    folder = str(tmp_path_factory.mktemp("live"))
    theirs = random_model(config, seed)
    theirs.to(torch.float32).save_pretrained(folder)
    theirs.to(torch.float64)
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, config.vocab_size, (2, t + pad))
    mask = np.ones_like(ids)
    mask[1, :pad] = 0
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        ref = theirs(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits
    ours = StableLmForCausalLM.from_pretrained(folder, dtype="float64")
    out = ours(ids, attention_mask=mask, position_ids=pos).logits
    assert rel(out, ref.numpy(), mask == 1) < 1e-6
    with monkeypatch.context() as m:
        import stablelm_ref.rotary as rotary

        original = rotary.rotary_cos_sin

        def float32_tables(position_ids, cfg, dtype):
            cos, sin = original(position_ids, cfg, np.float32)
            return cos.astype(dtype), sin.astype(dtype)

        m.setattr("stablelm_ref.model.rotary_cos_sin", float32_tables)
        same_tables = ours(ids, attention_mask=mask, position_ids=pos).logits
    assert rel(same_tables, ref.numpy(), mask == 1) < 1e-7


def test_legacy_config_and_bf16_sharded_checkpoint(tmp_path):
    config = transformers.StableLmConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, qk_layernorm=True,
                                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "partial_rotary_factor": 0.25})
    theirs = random_model(config, 7).to(torch.bfloat16)
    theirs.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    with open(tmp_path / "config.json") as f:
        d = json.load(f)
    rope = d.pop("rope_parameters")                         # rewrite in the legacy (published) form
    d.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"], rope_scaling=None)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(d, f)
    reference = transformers.StableLmForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, 120, (1, 10))
    with torch.no_grad():
        ref = reference(torch.tensor(ids)).logits.numpy()
    ours = StableLmForCausalLM.from_pretrained(tmp_path)     # bfloat16 weights cast to float32 on load
    assert ours.params["model.embed_tokens.weight"].dtype == np.float32
    assert rel(ours(ids).logits, ref, np.ones(ref.shape, bool)) < 1e-4
