"""The embedded default model (stablelm_ref/default_model, trained by tools/train_default.py).

Its held-out figure was measured once, on the GPU that trained it; here it is recomputed from the
shipped files by transformers (when installed) and by this project's own NumPy model, so the model,
its checkpoint and its evaluation data vouch for each other.
"""

import json
import os
import math
from pathlib import Path

import numpy as np
import pytest

MODEL_DIR = Path(__file__).resolve().parents[1] / "stablelm_ref" / "default_model"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "MODEL_CARD.md", "training_curve.png", "corpus_manifest.json",
         "heldout.safetensors", "eval.json")

# The subset figure in eval.json was computed in float32 on an H100 (PyTorch, TF32 off, eager
# attention) from the shipped bfloat16 weights upcast exactly to float32. A float32 recomputation on
# a CPU differs from it only by summation order: about 1e-7 relative per operation, grown over a
# handful of layers and reductions of at most a few thousand terms, so a mean loss agrees to ~1e-6
# relative (measured when the model was shipped: transformers 5.24 + torch 2.13 on this project's 2-core
# CPU gave 3.3e-7 relative in float32 and 4.1e-7 in float64). 1e-4 leaves a wide margin for other
# BLAS libraries, yet any real mistake moves the loss by far more: a wrong rotary width, a dropped
# bias, an untied head or an off-by-one in the label shift each change it by 1e-2 relative or more.
RTOL = 1e-4


@pytest.fixture(scope="module")
def eval_json():
    return json.loads((MODEL_DIR / "eval.json").read_text())


@pytest.fixture(scope="module")
def heldout():
    from safetensors.numpy import load_file

    return load_file(str(MODEL_DIR / "heldout.safetensors"))["input_ids"]


def subset(heldout, eval_json):
    return heldout[: eval_json["heldout_subset_windows"]].astype(np.int64)     # [4, L]


def test_files_present_and_small():
    for name in FILES:
        assert (MODEL_DIR / name).is_file(), f"{name} missing from {MODEL_DIR}"
    sizes = {p.name: p.stat().st_size for p in MODEL_DIR.glob("*.safetensors")}
    assert sizes["model.safetensors"] <= 25_000_000, sizes
    assert sum(sizes.values()) <= 25_000_000, sizes


def test_config_uses_the_family_features():
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "stablelm" and cfg["hidden_act"] == "silu"
    prf = cfg.get("rope_parameters", {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    assert prf == 0.25
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]                  # grouped-query attention
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == 0 and cfg["pad_token_id"] == 1


def test_heldout_windows_match_eval_json(heldout, eval_json):
    from safetensors import safe_open

    n, length = heldout.shape
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert heldout.dtype == np.int32 and length == cfg["max_position_embeddings"]
    assert (n, length) == (eval_json["heldout_windows"], eval_json["window_length"])
    assert heldout.min() >= 0 and heldout.max() < cfg["vocab_size"]
    assert eval_json["heldout_predicted_tokens"] == n * (length - 1)
    bpb = eval_json["heldout_loss_nats"] * n * (length - 1) / math.log(2) / eval_json["heldout_predicted_bytes"]
    assert bpb == pytest.approx(eval_json["heldout_bits_per_byte"], rel=1e-12)
    with safe_open(str(MODEL_DIR / "heldout.safetensors"), "np") as f:
        meta = f.metadata()
    assert float(meta["heldout_subset_loss_nats"]) == eval_json["heldout_subset_loss_nats"]


def test_reaches_the_target(eval_json):
    """Issue 5 asked for at most 1.5 bits per byte on the held-out modules; a retrain must not ship worse."""
    assert eval_json["heldout_bits_per_byte"] <= 1.5


def test_predicted_bytes_from_the_tokenizer(heldout, eval_json):
    """bits per byte divides by the UTF-8 bytes the predicted tokens spell: recount them."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<|padding|>") == 1
    source = 'def area(r: float) -> float:\n    """Circle área."""\n    return 3.14159 * r ** 2\n'
    assert tok.decode(tok.encode(source).ids) == source
    n_bytes = np.zeros(tok.get_vocab_size(), dtype=np.int64)                      # specials: 0 bytes
    for i in range(2, tok.get_vocab_size()):
        text = tok.decode([i])
        # a token that ends inside a multi-byte character decodes to U+FFFD: count its byte-level
        # symbols instead (one printable symbol per byte in GPT-2's byte-to-unicode table)
        n_bytes[i] = len(tok.id_to_token(i)) if "\ufffd" in text else len(text.encode("utf-8"))
    assert int(n_bytes[heldout[:, 1:]].sum()) == eval_json["heldout_predicted_bytes"]


def test_transformers_reproduces_the_subset_loss(heldout, eval_json):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.StableLmForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    model.eval()
    ids = torch.from_numpy(subset(heldout, eval_json))
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    assert loss == pytest.approx(eval_json["heldout_subset_loss_nats"], rel=RTOL)


def test_numpy_model_reproduces_the_subset_loss(heldout, eval_json):
    heads = pytest.importorskip("stablelm_ref.heads", reason="the NumPy causal LM has not landed yet")
    model = heads.StableLmForCausalLM.from_pretrained(MODEL_DIR, dtype="float32")
    ids = subset(heldout, eval_json)
    out = model(ids, labels=ids)
    assert float(out.loss) == pytest.approx(eval_json["heldout_subset_loss_nats"], rel=RTOL)


def test_cli_generate_without_model_works_offline():
    """`stablelm-ref generate` with no --model uses the shipped model, with the Hub switched off."""
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "stablelm_ref.cli", "generate", "--max-new-tokens", "12",
                          "def fibonacci(n):"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("def fibonacci(n):") and len(run.stdout) > len("def fibonacci(n):\n")
