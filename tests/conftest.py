"""Shared fixtures: tiny StableLM configurations and random checkpoints made on the fly; the hostile-input
tests' settings (cases), render limits (fast_limits) and directory snapshot (files_of); CUDA source through
nvcc's preprocessor (nvcc_expand)."""

import hashlib
import os
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from stablelm_ref import StableLmConfig, StableLmForCausalLM

# CI (.ci/run sets STABLELM_CI=1) draws the same hypothesis examples on every run, so that main's verdict
# does not depend on luck; elsewhere (make test, make fuzz) the examples stay random.
if os.environ.get("STABLELM_CI"):
    settings.register_profile("ci", derandomize=True, database=None)
    settings.load_profile("ci")

SHARED = os.environ.get("STABLELM_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
NEOX_TOKENIZER = os.path.join(SHARED, "data", "gpt-neox-20b-tokenizer.json")

# The family's shapes in miniature (docs/facts.md): 3b-4e1t (MHA), 2-1.6b (qkv bias), 2-12b (GQA, qk norm, parallel).
TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, model_type="stablelm")
VARIANTS = {
    "3b": {},
    "1_6b": dict(use_qkv_bias=True),
    "12b": dict(num_key_value_heads=2, qk_layernorm=True, use_parallel_residual=True),
}


def tiny_config(**overrides):
    return StableLmConfig.from_dict({**TINY, **overrides})


def random_params(model, seed=0, scale=0.2):
    """Random weights with LayerNorm weights and every bias moved away from (1, 0), so each one matters."""
    rng = np.random.default_rng(seed)
    for name, value in model.params.items():
        noise = rng.normal(0.0, scale, size=value.shape).astype(value.dtype)
        if "layernorm" in name or name.startswith("model.norm"):
            value = (value + noise) if name.endswith("weight") else noise
        elif name.endswith("bias"):
            value = noise
        model.params[name] = value
    return model


def tiny_model(seed=0, dtype="float64", cls=StableLmForCausalLM, **overrides):
    model = cls.from_config(tiny_config(**overrides), seed=seed, dtype=dtype, std=0.2)
    return random_params(model, seed)


@pytest.fixture(autouse=True)
def _no_tuning_files(monkeypatch):
    """The GPU engine's tuner keeps its choice on disk and reads it back (cuda/tune.py): tests time it
    afresh, so that no test reads what another (or an earlier run) chose. Tests of that file set a folder."""
    monkeypatch.setenv("STABLELM_REF_TUNE_CACHE", "off")


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return request.param


def _namespaces():
    import array_api_strict

    return {"numpy": np, "array_api_strict": array_api_strict}


@pytest.fixture(params=["numpy", "array_api_strict"])
def xp(request):
    """The concept tests run on NumPy and on array-api-strict, which refuses anything outside the standard."""
    return _namespaces()[request.param]


# ---- the hostile-input tests' shared pieces (test_hostile_classes.py, test_hostile_round3.py, test_checkpoint.py)
FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"


def cases(n_fast, n_fuzz=None):
    """hypothesis settings: n_fast generated cases in `make test`, n_fuzz (default 25x) under `make fuzz`; no
    deadline (a case may load a model) and no health check on slow or large cases or function-scoped fixtures."""
    return settings(max_examples=(n_fuzz or 25 * n_fast) if FUZZ else n_fast, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])


@pytest.fixture
def fast_limits(monkeypatch):
    """The chat-template render limits made small to keep the suite quick: (seconds, MiB); bounds asserted on a
    render are stated relative to them."""
    from stablelm_ref import tokenizer

    monkeypatch.setattr(tokenizer, "TEMPLATE_MAX_SECONDS", 0.3)
    monkeypatch.setattr(tokenizer, "TEMPLATE_MAX_BYTES", 64 * 2**20)
    return 0.3, 64


def files_of(directory):
    """{relative path: sha256} of every file under `directory`: what "nothing was changed" compares."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def nvcc_expand(tmp_path):
    """expand(name, text, arch="90"): CUDA source `text` through nvcc's device preprocessor (-E, sm_{arch}), its
    output; asserts that nvcc succeeded and redefined no macro (a probe's macro replaced by the shipped one's).
    Needs nvcc on PATH, no GPU; skips without it."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: the preprocessing check needs CUDA's nvcc (no GPU)")

    def expand(name, text, arch="90"):
        (tmp_path / f"{name}.cu").write_text(text)
        done = subprocess.run(["nvcc", "-E", "-cubin", f"-arch=sm_{arch}", f"{name}.cu"], cwd=tmp_path,
                              capture_output=True, text=True)
        assert done.returncode == 0 and "redefined" not in done.stderr, done.stderr[-2000:]
        return done.stdout

    return expand
