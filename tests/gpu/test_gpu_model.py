"""The same concept modules on the GPU through CuPy, with the CUDA kernels in the path: equal to the CPU reference.

Runs only where CuPy sees an NVIDIA GPU (make test-gpu on the device machine); skipped elsewhere.
Tolerances (relative 2-norm error against CPU float64):
- float32 on the GPU: 1e-5. cuBLAS and the kernels sum in other orders than NumPy (float32 unit
  roundoff 6e-8 times a few hundred accumulations, through a few layers: ~1e-6 observed); a wrong
  index, mask or layout gives errors of order 1.
- bfloat16: no fixed number; it must be no worse than transformers' own bfloat16 run (torch on the same
  GPU) against the same float64 reference, with 25% slack for rounding luck.
Each test that claims a kernel in the path checks that the kernel ran (a spy on kernels.py's registry).
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

from stablelm_ref import StableLmConfig, StableLmForCausalLM, kernels  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDENS = os.path.join(HERE, "..", "goldens")
DEFAULT_MODEL = os.path.join(HERE, "..", "..", "stablelm_ref", "default_model")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


class Spy:
    """Counts the calls of the CuPy implementations in kernels.py that did not decline."""

    def __init__(self):
        self.ran, self.saved = {}, {}

    def __enter__(self):
        for (op, lib), fn in list(kernels._IMPLEMENTATIONS.items()):
            if lib == "cupy":
                self.saved[op] = fn
                kernels._IMPLEMENTATIONS[(op, lib)] = self._wrap(op, fn)
        return self

    def _wrap(self, op, fn):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            self.ran[op] = self.ran.get(op, 0) + (out is not None)
            return out
        return wrapped

    def __exit__(self, *exc):
        for op, fn in self.saved.items():
            kernels._IMPLEMENTATIONS[(op, "cupy")] = fn


def host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


@pytest.mark.parametrize("variant", ["3b", "1_6b", "12b", "rope_dynamic", "gelu"])
def test_gpu_float32_equals_cpu_float64(variant):
    # the golden models have head_dim 16: attention runs the reference, the other kernels run
    folder = os.path.join(GOLDENS, variant)
    cpu = StableLmForCausalLM.from_pretrained(folder, dtype="float64")
    gpu = StableLmForCausalLM.from_pretrained(folder, dtype="float32", device="gpu")
    ids = np.random.default_rng(0).integers(0, cpu.config.vocab_size, (2, 8))
    with Spy() as spy:
        out = gpu(ids).logits
    assert spy.ran.get("layer_norm") and spy.ran.get("rotary_qk")
    assert spy.ran.get("add_layer_norm", 0) == (0 if cpu.config.use_parallel_residual else cpu.config.num_hidden_layers)
    assert isinstance(out, cupy.ndarray) and out.dtype == np.float32
    assert rel(out.get(), cpu(ids).logits) < 1e-5


def kernel_config(head_dim, kv_heads, **extra):
    heads = 4
    return StableLmConfig.from_dict(dict(
        vocab_size=300, hidden_size=heads * head_dim, intermediate_size=3 * head_dim, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        partial_rotary_factor=0.25, model_type="stablelm", **extra))


@pytest.mark.parametrize("head_dim,kv_heads,extra", [
    (64, 2, {}), (80, 4, {}), (128, 1, dict(use_qkv_bias=True)),
    (160, 2, dict(qk_layernorm=True, use_parallel_residual=True)),
])
def test_flash_kernel_in_the_model_float32_equals_cpu_float64(head_dim, kv_heads, extra):
    """model(ids) with the flash kernel in the path, with left padding, then decode steps over the KV cache."""
    cpu = StableLmForCausalLM.from_config(kernel_config(head_dim, kv_heads, **extra), seed=head_dim,
                                          dtype="float64", std=0.08)
    gpu = StableLmForCausalLM(cpu.config, {k: cupy.asarray(v.astype(np.float32)) for k, v in cpu.params.items()},
                              device="gpu")
    rng = np.random.default_rng(head_dim)
    ids = rng.integers(0, 300, (3, 150))
    mask = np.ones_like(ids)
    mask[1, :40] = 0
    mask[2, :149] = 0                                        # one real token: 149 query rows see no key
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)

    def run(model):
        out = model(ids, attention_mask=mask, position_ids=pos, use_cache=True)
        logits, cache, m = [host(out.logits)], out.past_key_values, mask
        for i in range(3):
            m = np.concatenate([m, np.ones((3, 1), m.dtype)], axis=1)
            step = model(ids[:, -1:] + i, attention_mask=m, position_ids=m.sum(1, keepdims=True) - 1,
                         past_key_values=cache)
            logits.append(host(step.logits))
        return np.concatenate(logits, axis=1)

    with Spy() as spy:
        got = run(gpu)
    assert spy.ran.get("attention") == 4 * 2                # every layer of every forward ran the kernel
    assert rel(got, run(cpu)) < 1e-5


def test_gpu_kv_cache_and_generate_equal_cpu():
    folder = os.path.join(GOLDENS, "12b")
    cpu = StableLmForCausalLM.from_pretrained(folder, dtype="float32")
    gpu = StableLmForCausalLM.from_pretrained(folder, dtype="float32", device="gpu")
    ids = np.array([[5, 6, 7, 8, 9], [1, 1, 7, 8, 9]])
    mask = (ids != 1).astype(np.int64)
    a = cpu.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=1)
    b = gpu.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=1)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(host(b)))


@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_gpu_bfloat16_no_worse_than_transformers(tmp_path, head_dim):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.StableLmConfig(vocab_size=512, hidden_size=4 * head_dim, intermediate_size=640,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512, qk_layernorm=True, use_qkv_bias=True)
    torch.manual_seed(0)
    model = transformers.StableLmForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    model.to(torch.bfloat16).save_pretrained(tmp_path)       # weights exactly bf16 for both sides
    ids = np.random.default_rng(1).integers(0, 512, (2, 300))
    ref = StableLmForCausalLM.from_pretrained(tmp_path, dtype="float64")(ids).logits
    ours = StableLmForCausalLM.from_pretrained(tmp_path, device="gpu")  # bfloat16 by default on the GPU
    assert str(ours.dtype) == "bfloat16"
    with Spy() as spy:
        logits = ours(ids).logits
    assert spy.ran.get("attention") == 4
    assert spy.ran.get("linear") == 4 * 7 + 1                  # every projection and the lm_head: cuBLAS
    assert spy.ran.get("rotary_qk") == 4 and spy.ran.get("add_layer_norm") == 4
    ours_err = rel(logits.astype(cupy.float32).get(), ref)
    theirs = transformers.StableLmForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        theirs_err = rel(theirs(torch.tensor(ids).cuda()).logits.float().cpu().numpy(), ref)
    print(f"head_dim {head_dim}, bfloat16 vs float64: stablelm-ref {ours_err:.3e}, transformers {theirs_err:.3e}; "
          f"logits dtype {logits.dtype}")
    assert ours_err <= 1.25 * theirs_err
    assert logits.dtype == ours.dtype                         # the stream stayed bfloat16 (as transformers')


def greedy_agrees_with_reference(ids_prompt, generated, cpu, gpu):
    """Each greedily generated token is, under the float64 reference (teacher-forced on the same tokens),
    the best token or within the bfloat16 error band of it: its reference logit is at most 2 * (the
    largest |bf16 - float64| logit error measured on this very sequence) below the best one."""
    seq = np.concatenate([ids_prompt, generated])[None, :]
    n = len(generated)
    ref = cpu(seq).logits[0, -n - 1:-1]                                  # [n, vocab], float64
    err = np.abs(host(gpu(seq).logits.astype(cupy.float32))[0, -n - 1:-1] - ref).max()
    gap = ref.max(axis=1) - ref[np.arange(n), generated]                 # 0 where the reference agrees
    assert (gap <= 2 * err).all(), (gap, err)
    return int((gap == 0).sum()), float(err)


def test_greedy_generation_on_the_gpu_follows_the_reference():
    """The default model (head_dim 64: the kernel in the path), bfloat16 on the GPU, 24 greedy tokens."""
    from stablelm_ref.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(DEFAULT_MODEL)
    cpu = StableLmForCausalLM.from_pretrained(DEFAULT_MODEL, dtype="float64")
    gpu = StableLmForCausalLM.from_pretrained(DEFAULT_MODEL, device="gpu")
    prompt = np.asarray(tok.encode("def fibonacci(n):"))
    out = np.asarray(host(gpu.generate(prompt[None, :], max_new_tokens=24)))[0]
    generated = out[len(prompt):]
    assert len(generated) >= 1 and (out[:len(prompt)] == prompt).all()
    same, err = greedy_agrees_with_reference(prompt, generated, cpu, gpu)
    print(f"{same}/{len(generated)} tokens are the float64 reference's argmax; max bf16 logit error {err:.3f}")


def test_cli_generate_on_the_gpu():
    """`stablelm-ref generate --device gpu` prints the prompt and a continuation that the float64 reference
    accepts token by token (when the printed text tokenizes back into prompt + continuation)."""
    import subprocess
    import sys

    from stablelm_ref.tokenizer import Tokenizer

    root = os.path.dirname(os.path.dirname(HERE))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "stablelm_ref.cli", "generate", "--device", "gpu", "--stats",
                          "--max-new-tokens", "24", "def fibonacci(n):"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("def fibonacci(n):") and len(run.stdout.rstrip("\n")) > len("def fibonacci(n):")
    print(repr(run.stdout), run.stderr.strip())
    tok = Tokenizer.from_pretrained(DEFAULT_MODEL)
    prompt = np.asarray(tok.encode("def fibonacci(n):"))
    printed = np.asarray(tok.encode(run.stdout.rstrip("\n")))
    if len(printed) <= len(prompt) or not (printed[:len(prompt)] == prompt).all():
        pytest.skip("the printed text does not tokenize back into prompt + continuation")
    cpu = StableLmForCausalLM.from_pretrained(DEFAULT_MODEL, dtype="float64")
    gpu = StableLmForCausalLM.from_pretrained(DEFAULT_MODEL, device="gpu")
    greedy_agrees_with_reference(prompt, printed[len(prompt):], cpu, gpu)
