"""model.generate on the GPU: generation.py's one loop over the GPU step backends.

- float32 on the GPU (the concept modules on CuPy, the reference step backend): greedy tokens equal the
  CPU reference token for token on a left-padded batch with eos/pad (the float32 logits agree to ~1e-6
  relative, test_gpu_model.py; these goldens' top-2 margins are far larger).
- bfloat16 (the CUDA-graph engine, fast_gpu.EngineSteps): each decode step's logits equal the model's own
  bfloat16 forward (its reference path, teacher-forced on the generated tokens) within bf16 rounding: the
  engine keeps a float32 residual and rounds where transformers' bf16 model rounds, so the two differ by a
  few bf16 ulps of the logits (relative 2-norm <= 3e-2, decode_cases.py's bound for bf16 against float32
  plus the reference's own bf16 error; seen ~1e-2); every greedy pick whose top-2 margin exceeds twice
  the largest difference must agree.
- bfloat16 logits against the float64 CPU reference (the issue's accuracy figure): the engine's (prefill's
  last logits, then decode steps through EngineSteps, teacher-forced) no worse than transformers' bfloat16
  forward on the same weights and positions (tools/bench_gpu.bf16_logit_errors, also in make bench-gpu).
- sampling on the device: the processors (repetition penalty, temperature, top-k, top-p) and the sampler
  run on the engine's float32 logits with CuPy, the same functions as on the CPU. Given the same logits,
  the same seed draws the same tokens as the CPU (the uniform draws come from the host Generator; only a
  draw within float64 rounding of a cumulative boundary could differ), and the frequencies of 20,000 draws
  pass a chi-square test (p > 1e-4) against the CPU-processed probabilities.
"""

import os
import sys

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
try:
    if cupy.cuda.runtime.getDeviceCount() < 1:
        raise RuntimeError
except Exception:  # noqa: BLE001
    pytest.skip("no NVIDIA GPU visible to CuPy", allow_module_level=True)

from stablelm_ref import StableLmConfig, StableLmForCausalLM  # noqa: E402
from stablelm_ref import fast_gpu  # noqa: E402
from stablelm_ref.generation import ModelSteps, process_logits, sample, softmax, step_backend  # noqa: E402

GOLDENS = os.path.join(os.path.dirname(__file__), "..", "goldens")


def _host(a):
    return np.asarray(a.get() if hasattr(a, "get") else a)


def _left_pad(rows, pad=1):
    width = max(map(len, rows))
    ids = np.array([[pad] * (width - len(r)) + list(r) for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("variant", ["3b", "12b"])
def test_float32_gpu_generate_equals_cpu_left_padded(variant):
    folder = os.path.join(GOLDENS, variant)
    cpu = StableLmForCausalLM.from_pretrained(folder, dtype="float32")
    gpu = StableLmForCausalLM.from_pretrained(folder, dtype="float32", device="gpu")
    rng = np.random.default_rng(1)
    rows = [rng.integers(2, cpu.config.vocab_size, n).tolist() for n in (9, 4, 6)]
    ids, mask = _left_pad(rows)
    assert isinstance(step_backend(gpu, 3, 20), ModelSteps)               # float32: the concept modules
    a = cpu.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=1, eos_token_id=None)
    b = gpu.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=1, eos_token_id=None)
    np.testing.assert_array_equal(a, _host(b))
    eos = int(a[1, 9 + 3])
    a = cpu.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=1, eos_token_id=eos)
    b = gpu.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=1, eos_token_id=eos)
    np.testing.assert_array_equal(a, _host(b))


def _bf16_model(tmp_path, **overrides):
    """A random StableLM with sharp logits, saved in bfloat16 and loaded on the GPU (bfloat16)."""
    c = dict(vocab_size=1024, hidden_size=320, intermediate_size=864, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, eos_token_id=None, pad_token_id=1)
    c.update(overrides)
    StableLmForCausalLM.from_config(StableLmConfig(**c), seed=3, std=0.08).save_pretrained(tmp_path, dtype="bfloat16")
    return StableLmForCausalLM.from_pretrained(tmp_path, device="gpu")


CASES = {
    "3b-like, GQA": {},
    "12b-like: qk LayerNorm, parallel residual, D=160": dict(hidden_size=640, intermediate_size=1728,
                                                             qk_layernorm=True, use_parallel_residual=True),
    "2-1.6b-like: qkv bias, D=64": dict(hidden_size=256, intermediate_size=704, use_qkv_bias=True,
                                         num_key_value_heads=4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_engine_equals_the_models_own_forward(tmp_path, case):
    _engine_against_forward(tmp_path, case, [list(range(5, 19)), [7, 8, 9], list(range(30, 38))])


def _edited(model):
    """Edits of every kind the engine follows: vectors and a matrix in place, a tensor replaced, a config field
    (computed on the host in float32, written back in bfloat16)."""
    p, rng = model.params, np.random.default_rng(5)

    def changed(name, f):
        host = cupy.asnumpy(p[name])
        return cupy.asarray(f(host.astype(np.float32)).astype(host.dtype))

    for name, f in (("model.norm.weight", lambda w: w * rng.uniform(0.5, 1.5, w.shape)),
                    ("model.layers.0.input_layernorm.bias", lambda b: b + 0.25),
                    ("model.layers.1.mlp.up_proj.weight", lambda w: -w)):
        p[name][...] = changed(name, f)                                      # in place
    p["model.layers.0.self_attn.o_proj.weight"] = changed("model.layers.0.self_attn.o_proj.weight", lambda w: -w)
    model.config.layer_norm_eps = 1e-2


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_engine_follows_edits_of_the_model(tmp_path, case):
    """After a generate through the engine, the model edited in place (a LayerNorm weight and bias, gate|up's up
    rows), a tensor replaced and a config field: the engine's logits follow the edited model's own forward as
    closely as before (the engine had kept float32 copies of the vectors, and every copy after a replacement or a
    config edit)."""
    engine, model = _engine_against_forward(tmp_path, case, [list(range(5, 19)), [7, 8, 9]], edit=_edited)
    assert model.fast().unsupported is None


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_generate_through_the_whole_step_kernel(tmp_path, case):
    """Batch 1 with the engine's step as one kernel (decode_step.cu, engine.megakernel True): greedy generate
    against the model's own bf16 forward with the same bounds as the per-layer step (a left-padded prompt);
    seeded sampling through it reproducible."""
    engine, model = _engine_against_forward(tmp_path, case, [[7, 8, 9, 10, 11, 12]], megakernel=True, lead_pad=3)
    assert engine.uses_step_kernel(1) and [fn.tag for fn in engine._plan(1)][:2] == ["embed", "step"]
    ids = np.array([list(range(5, 19))])
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=7)
    a, b = _host(model.generate(ids, **kw)), _host(model.generate(ids, **kw))
    assert engine.uses_step_kernel(1) and engine.sampler is not None
    np.testing.assert_array_equal(a, b)


def _engine_against_forward(tmp_path, case, rows, megakernel=None, lead_pad=0, edit=None):
    """generate through the engine on a left-padded batch of `rows` against the model's own forward on the
    tokens it chose: logits within 3e-2 relative, decided greedy picks equal (lead_pad: that many padding
    positions before every row; edit(model): applied after a first generate through the engine). Returns the
    engine and the model."""
    model = _bf16_model(tmp_path, **CASES[case])
    B = len(rows)
    steps = step_backend(model, B, 40)
    assert isinstance(steps, fast_gpu.EngineSteps)
    with steps.context():                      # builds the engine, which model.generate below steps through
        steps.engine.megakernel = megakernel
    ids, mask = _left_pad(rows)
    ids, mask = (np.pad(a, ((0, 0), (lead_pad, 0)), constant_values=v) for a, v in ((ids, 1), (mask, 0)))
    if edit is not None:
        model.generate(ids, attention_mask=mask, max_new_tokens=4)
        edit(model)
    T = ids.shape[1]
    logits = []
    engine_class = type(steps.engine)
    real_queue = engine_class.queue_picks_copy

    def keep(self):                     # after each step's graph, before the step queued ahead of the loop
        logits.append(self.logits_buf[:B].get().copy())
        return real_queue(self)

    engine_class.queue_picks_copy = keep
    try:
        out = _host(model.generate(ids, attention_mask=mask, max_new_tokens=12))
    finally:
        engine_class.queue_picks_copy = real_queue
    assert out.shape == (B, T + 12)
    n = 11
    full = np.concatenate([mask, np.ones((B, 12), np.int64)], axis=1)
    pos = np.maximum(np.cumsum(full, axis=1) - 1, 0)
    ref = model(out, attention_mask=full, position_ids=pos).logits[:, T:T + n].astype(cupy.float32).get()
    ours = np.stack(logits, axis=1)                                        # [B, 11, V]
    err = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    print(f"{case}: engine vs the model's bf16 forward, relative error {err:.2e}")
    assert err < 3e-2
    assert np.array_equal(np.argmax(ours, axis=-1), out[:, T + 1:T + 1 + n])   # the loop kept the graph's pick
    top2 = np.sort(ref, axis=-1)[..., -2:]
    decided = top2[..., 1] - top2[..., 0] > 2 * np.abs(ours - ref).max(axis=-1)   # margin > twice our error
    agree = np.argmax(ref, axis=-1) == out[:, T + 1:T + 1 + n]
    assert agree[decided].all() and decided.mean() > 0.25
    # the reference step backend on the same model: the same first token (the prefill is shared code)
    ref_out = _host(model.generate(ids, attention_mask=mask, max_new_tokens=1, engine="reference"))
    np.testing.assert_array_equal(ref_out, out[:, :T + 1])
    return model.fast().engine, model


@pytest.mark.parametrize("case", ["3b-like, GQA", "12b-like: qk LayerNorm, parallel residual, D=160"])
def test_bf16_engine_logits_no_worse_than_transformers(tmp_path, case):
    """Relative 2-norm error against the float64 CPU run, ours <= 1.25 x transformers'. Both compute with bf16
    weights and activations and float32 accumulation; the engine keeps the residual stream in float32 where
    transformers rounds it to bf16 after every block, so it should not be worse. The 25% slack (as in
    test_gpu_model.py's bf16 test) is for rounding luck: at this size both errors are a few thousand
    rounding errors through 3 layers, and the two runs round different intermediates."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
    import bench_gpu

    model = _bf16_model(tmp_path, **CASES[case])
    hf = transformers.StableLmForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda().eval()
    errs = bench_gpu.bf16_logit_errors(model, hf, prompt=48, new=16)
    print(f"{case}: bf16 logits vs float64, engine {errs['engine']:.3e}, transformers {errs['transformers']:.3e}")
    assert 0 < errs["engine"] <= 1.25 * errs["transformers"]


def test_sampling_seeded_reproducible_and_eos(tmp_path):
    model = _bf16_model(tmp_path)
    ids = np.array([[5, 6, 7, 8, 9]])
    kw = dict(max_new_tokens=20, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.3)
    a, b = _host(model.generate(ids, seed=4, **kw)), _host(model.generate(ids, seed=4, **kw))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, _host(model.generate(ids, seed=5, **kw)))
    eos = int(a[0, 5 + 4])
    cut = _host(model.generate(ids, seed=4, eos_token_id=eos, **kw))
    stop = 5 + int(np.argmax(a[0, 5:] == eos)) + 1
    np.testing.assert_array_equal(cut[0], a[0, :stop])


@pytest.mark.parametrize("settings", [dict(temperature=0.8, top_k=50, top_p=0.9),
                                      dict(temperature=1.3, top_k=0, top_p=0.5, repetition_penalty=1.5)])
def test_device_sampling_matches_cpu_processors(settings):
    """The same logits on both sides: the device's draws equal the CPU's draw for draw (same seed), and their
    frequencies fit the CPU-processed distribution (chi-square over the tokens expected >= 5 times)."""
    from scipy import stats

    rng = np.random.default_rng(0)
    V, n = 2000, 20000
    z = (rng.standard_normal(V) * 2.0).astype(np.float32)                   # one row of logits, tiled
    history = rng.integers(0, V, (1, 30))
    s = dict(do_sample=True, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0)
    s.update(settings)
    cpu_p = softmax(process_logits(z[None].copy(), history, s).astype(np.float64))[0]
    scores = cupy.asarray(np.tile(z, (n, 1)))
    hist = cupy.asarray(np.tile(history, (n, 1)))
    dev = process_logits(scores, hist, s)

    draws = _host(sample(softmax(dev.astype(cupy.float64)), np.random.default_rng(9)))
    cpu_draws = sample(np.tile(cpu_p, (n, 1)), np.random.default_rng(9))
    assert (draws != cpu_draws).mean() < 1e-3
    assert cpu_p[draws].min() > 0                                          # never a filtered token
    counts = np.bincount(draws, minlength=V)
    expected = cpu_p * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    p = stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue
    assert p > 1e-4, p


def test_cli_generate_on_the_gpu_fast_and_reference():
    """`stablelm-ref generate --device gpu` calls model.generate: the graph engine (fast) or the concept
    modules on CuPy (reference); greedy bf16 decodes of the same model agree at least at the start."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    outs = {}
    for engine in ("fast", "reference"):
        extra = ["--temperature", "0.7", "--seed", "1"] if engine == "fast" else []
        for args in ([], extra) if extra else ([],):
            run = subprocess.run([sys.executable, "-m", "stablelm_ref.cli", "generate", "--device", "gpu", "--engine",
                                  engine, "--stats", "--max-new-tokens", "24", *args, "def fibonacci(n):"],
                                 capture_output=True, text=True, env=env, timeout=300)
            assert run.returncode == 0, run.stderr
            assert run.stdout.startswith("def fibonacci(n):") and "decode: " in run.stderr
            print(engine, args, repr(run.stdout), run.stderr.strip())
            outs[(engine, bool(args))] = run.stdout
    assert outs[("fast", False)][:24] == outs[("reference", False)][:24]

