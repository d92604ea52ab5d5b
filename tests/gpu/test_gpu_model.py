"""The same concept modules on the GPU through CuPy: equal to the CPU float64 reference.

Runs only where CuPy sees an NVIDIA GPU (make test-gpu on the device machine); skipped elsewhere.
Tolerances (relative 2-norm error against CPU float64):
- float32 on the GPU: 1e-5 (cuBLAS may use other summation orders / FMA; float32 epsilon 6e-8 times a
  few hundred accumulations, observed ~1e-6).
- bfloat16: no fixed number; it must be no worse than transformers' own bfloat16 run (torch on the same
  GPU) against the same float64 reference, with 25% slack for rounding luck.
"""

import os

import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="the GPU path needs CuPy")
try:
    if cupy.cuda.runtime.getDeviceCount() < 1:
        raise RuntimeError
except Exception:  # noqa: BLE001
    pytest.skip("no NVIDIA GPU visible to CuPy", allow_module_level=True)

from stablelm_ref import StableLmForCausalLM  # noqa: E402

GOLDENS = os.path.join(os.path.dirname(__file__), "..", "goldens")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("variant", ["3b", "1_6b", "12b", "rope_dynamic", "gelu"])
def test_gpu_float32_equals_cpu_float64(variant):
    folder = os.path.join(GOLDENS, variant)
    cpu = StableLmForCausalLM.from_pretrained(folder, dtype="float64")
    gpu = StableLmForCausalLM.from_pretrained(folder, dtype="float32", device="gpu")
    ids = np.random.default_rng(0).integers(0, cpu.config.vocab_size, (2, 8))
    out = gpu(ids).logits
    assert isinstance(out, cupy.ndarray) and out.dtype == np.float32
    assert rel(out.get(), cpu(ids).logits) < 1e-5


def test_gpu_kv_cache_and_generate_equal_cpu():
    folder = os.path.join(GOLDENS, "12b")
    cpu = StableLmForCausalLM.from_pretrained(folder, dtype="float32")
    gpu = StableLmForCausalLM.from_pretrained(folder, dtype="float32", device="gpu")
    ids = np.array([[5, 6, 7, 8, 9], [1, 1, 7, 8, 9]])
    mask = (ids != 1).astype(np.int64)
    a = cpu.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=1)
    b = gpu.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=1)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b.get() if hasattr(b, "get") else b))


def test_gpu_bfloat16_no_worse_than_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.StableLmConfig(vocab_size=512, hidden_size=256, intermediate_size=640, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         qk_layernorm=True, use_qkv_bias=True)
    torch.manual_seed(0)
    model = transformers.StableLmForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    model.to(torch.bfloat16).save_pretrained(tmp_path)       # weights exactly bf16 for both sides
    ids = np.random.default_rng(1).integers(0, 512, (2, 64))
    ref = StableLmForCausalLM.from_pretrained(tmp_path, dtype="float64")(ids).logits
    ours = StableLmForCausalLM.from_pretrained(tmp_path, device="gpu")  # bfloat16 by default on the GPU
    assert str(ours.dtype) == "bfloat16"
    ours_err = rel(ours(ids).logits.astype(cupy.float32).get(), ref)
    theirs = transformers.StableLmForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        theirs_err = rel(theirs(torch.tensor(ids).cuda()).logits.float().cpu().numpy(), ref)
    print(f"bfloat16 vs float64: stablelm-ref {ours_err:.3e}, transformers {theirs_err:.3e}")
    assert ours_err <= 1.25 * theirs_err
