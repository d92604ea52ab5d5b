"""transformers' meaning at the edges, and the float64 claim stated honestly.

transformers builds its RoPE cos/sin tables in float32 even for a float64 model, so past about a
thousand positions a float64 run of transformers differs from our float64 reference by far more
than float64 rounding (the table's angle p * theta_i carries an error of ~p * 2**-24 rad). Here that
one difference is removed: `float64_rope(theirs)` replaces transformers' rotary forward with the same
formula in float64 (inv_freq = 1 / rope_theta ** (arange(0, d, 2) / d), angles = p * inv_freq), and
everything else, transformers' own code, must then agree with ours to float64 rounding:

    logits at 4,096 positions (the 3b-4e1t context, its 80-dim heads with 20 rotary dims):
        max |ours - theirs| <= 1e-10 * max |logits|
    (float64 rounding of the ~30 reductions of length <= 4096 on the path is ~1e-13 relative; 1e-10
    leaves three orders of headroom and still fails by orders of magnitude with float32 tables)

tools/float64_rope_bound.py prints the table of README.md (the bound by sequence length, both ways).

Also here: transformers' loss on a left-padded batch with -100 labels (its default sdpa attention
gives a query row with no key to attend to an output of 0, which the next positions' loss sees), and
generate(eos_token_id=None) passed explicitly (no EOS stop in transformers 5).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="make crosscheck installs torch (CPU) and transformers")
transformers = pytest.importorskip("transformers", reason="make crosscheck installs torch (CPU) and transformers")

from conftest import VARIANTS, tiny_model  # noqa: E402

# 3b-4e1t's head (80 dims, 20 rotary, rope_theta 10000) and context (4096), one head and one layer: 2 cores
LONG = dict(vocab_size=101, hidden_size=80, intermediate_size=96, num_hidden_layers=1, num_attention_heads=1,
            num_key_value_heads=1, max_position_embeddings=4096, partial_rotary_factor=0.25)


def float64_rope(theirs, config):
    """Make transformers' rotary tables float64 (the only float32 step of its float64 forward)."""
    rotary = theirs.model.rotary_emb
    d = config.rotary_ndims

    def forward(x, position_ids):
        inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))   # [d/2]
        freqs = position_ids[..., None].to(torch.float64) * inv                                # [B, T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)                                                # [B, T, d]
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    rotary.forward = forward
    return theirs


def pair(tmp_path, seed=3, **overrides):
    ours = tiny_model(seed=seed, dtype="float64", **overrides)
    ours.save_pretrained(tmp_path)
    theirs = transformers.StableLmForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    return ours, theirs


def logits_error(ours, theirs, ids, **kwargs):
    with torch.no_grad():
        want = theirs(torch.tensor(ids), **{k: torch.tensor(v) for k, v in kwargs.items()}).logits.numpy()
    got = ours(ids, **kwargs).logits
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_float64_at_4096_positions_with_float64_tables(tmp_path):
    ours, theirs = pair(tmp_path, **LONG)
    ids = np.random.default_rng(0).integers(0, 101, (1, 4096))
    float32_tables = logits_error(ours, theirs, ids)
    patched = logits_error(ours, float64_rope(theirs, ours.config), ids)
    print(f"4096 positions: relative max error {float32_tables:.1e} with transformers' float32 tables, "
          f"{patched:.1e} with float64 tables")
    assert patched <= 1e-10
    assert float32_tables > 100 * patched   # the patch is what closes the gap (the test can fail without it)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_loss_on_a_left_padded_batch_equals_transformers_sdpa(tmp_path, variant):
    """Rows padded on the left; labels -100 on the padding and at a few tokens. A padding position's
    query has no key to attend to: transformers' default (sdpa) gives it 0, and since position t predicts
    labels[t + 1], the last padding position's logits enter the loss. float64 tables on both sides, so
    the logits agree to float64 rounding (1e-12 relative); the loss to transformers' float32 rounding."""
    ours, theirs = pair(tmp_path, **VARIANTS[variant], pad_token_id=1)
    assert theirs.config._attn_implementation == "sdpa"
    float64_rope(theirs, ours.config)
    rng = np.random.default_rng(5)
    ids = rng.integers(2, 101, (3, 9))
    mask = np.ones_like(ids)
    for row, pad in enumerate([4, 0, 7]):
        ids[row, :pad], mask[row, :pad] = 1, 0
    labels = np.where(mask == 1, ids, -100)
    labels[1, 3] = -100
    with torch.no_grad():
        want = theirs(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    got = ours(ids, attention_mask=mask, labels=labels)
    # transformers computes the loss in float32 (ForCausalLMLoss casts the logits): float32 rounding of a
    # log-softmax over 101 classes and a mean of <= 27 terms is ~1e-7 relative; 1e-6 is the bound
    assert abs(got.loss - float(want.loss)) <= 1e-6 * abs(float(want.loss))
    np.testing.assert_allclose(got.logits, want.logits.numpy(), rtol=0, atol=1e-12 * np.abs(got.logits).max())


def test_explicit_eos_none_generates_like_transformers(tmp_path):
    probe = tiny_model(seed=3, dtype="float64", eos_token_id=None, pad_token_id=1)
    ids = np.array([[5, 9, 23, 44, 7], [1, 1, 8, 30, 2]])
    mask = (ids != 1).astype(np.int64)
    eos = int(probe.generate(ids, attention_mask=mask, max_new_tokens=10)[0, 5 + 2])   # row 0 emits it at step 2
    ours, theirs = pair(tmp_path, eos_token_id=eos, pad_token_id=1)
    for kwargs in ({}, {"eos_token_id": None}):
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=10, **kwargs)
        with torch.no_grad():
            want = theirs.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=10,
                                   do_sample=False, **kwargs).numpy()
        np.testing.assert_array_equal(got, want)
    assert got.shape[1] == 5 + 10                                   # eos_token_id=None: no stop


@pytest.mark.parametrize("places", [
    dict(rope_theta=500.0, partial_rotary_factor=0.5, rope_scaling={"type": "linear", "factor": 2.0}),   # legacy
    dict(rope_parameters={"rope_type": "dynamic", "factor": 3.0, "rope_theta": 20000.0,
                          "partial_rotary_factor": 0.5}),                                            # transformers 5
    dict(rope_theta=20000.0, rope_parameters={"rope_type": "default", "rope_theta": 20000.0}),
    dict(rope_scaling={"type": "linear", "factor": 2.0, "rope_theta": 700.0},
         rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 700.0}),
])
def test_the_rope_values_we_accept_mean_what_they_mean_to_transformers(places):
    """A rope value that config.json spells in several places loads only when the places agree (test_config.py);
    those that load give transformers 5 and us the same theta, rotary fraction, scaling type and factor."""
    from stablelm_ref import StableLmConfig

    from conftest import TINY

    ours = StableLmConfig.from_dict({**TINY, **places})
    theirs = transformers.StableLmConfig.from_dict({**TINY, **places}).rope_parameters
    assert (ours.rope_theta, ours.partial_rotary_factor, ours.rope_type) == \
        (theirs["rope_theta"], theirs.get("partial_rotary_factor", 0.25), theirs["rope_type"])
    assert (ours.rope_scaling or {}).get("factor") == theirs.get("factor")


@pytest.mark.parametrize("value", ["bfloat16", "float64", "int8", "float8_e4m3fn", "torch.float16", "", "float 16"])
@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_a_weights_dtype_name_loads_here_where_transformers_loads_it(key, value):
    """config.json's "dtype" / "torch_dtype": transformers 5 reads a string as getattr(torch, name), so any torch
    dtype's name loads (a quantised checkpoint's "int8", "float8_e4m3fn") and a string that is not a name
    ("torch.float16", "") is refused. Each string value here: we load it exactly when transformers does. (A name
    torch lacks, "auto", loads here: it is bookkeeping, and without torch transformers keeps it too.)"""
    from stablelm_ref import StableLmConfig
    from stablelm_ref.errors import ConfigError

    from conftest import TINY

    try:
        theirs = transformers.StableLmConfig.from_dict({**TINY, key: value}).dtype
    except AttributeError:                                              # module 'torch' has no attribute ...
        theirs = None
    try:
        ours = getattr(StableLmConfig.from_dict({**TINY, key: value}), key)
    except ConfigError:
        ours = None
    assert (ours is None) == (theirs is None)
    if theirs is not None:
        assert theirs == getattr(torch, ours)
