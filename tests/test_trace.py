"""trace.py: recording every intermediate, trace files, comparison and the trace/compare commands."""

import json
import math
import os
import re
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from stablelm_ref import StableLmForCausalLM
from stablelm_ref.errors import CheckpointError, StableLmError
from stablelm_ref.trace import (
    DEFAULT_TOLERANCES,
    compare_traces,
    default_tolerances,
    first_divergence,
    main,
    read_trace,
    run_with_trace,
    tolerance_line,
    write_trace,
)

from conftest import VARIANTS, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = "5,17,42,8,99,3"


def expected_names(config):
    names = ["model.embed_tokens"]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm"] + [p + f"self_attn.{n}_proj" for n in "qkv"]
        if config.qk_layernorm:
            names += [p + "self_attn.q_layernorm", p + "self_attn.k_layernorm"]
        names += [p + f"self_attn.{n}" for n in ("rotary_q", "rotary_k", "attn_weights", "attn_output", "o_proj")]
        if not config.use_parallel_residual:
            names.append(p + "post_attention_layernorm")
        names += [p + f"mlp.{n}" for n in ("gate_proj", "up_proj", "act", "down_proj")] + [f"model.layers.{i}"]
    return names + ["model.norm", "lm_head"]


def test_run_with_trace_names_order_and_values(variant):
    model = tiny_model(seed=7, **VARIANTS[variant])
    c = model.config
    ids = [[5, 17, 42, 8]]
    logits, trace = model.run_with_trace(ids)
    assert list(trace) == expected_names(c)
    out = model(ids, output_hidden_states=True)
    np.testing.assert_array_equal(logits, out.logits)          # tracing does not change the result
    np.testing.assert_array_equal(trace["lm_head"], out.logits)
    np.testing.assert_array_equal(trace["model.norm"], out.hidden_states[-1])
    np.testing.assert_array_equal(trace["model.layers.0"], out.hidden_states[1])
    assert trace["model.layers.1.self_attn.q_proj"].shape == (1, c.num_attention_heads, 4, c.head_dim)
    assert trace["model.layers.1.self_attn.rotary_k"].shape == (1, c.num_key_value_heads, 4, c.head_dim)
    w = trace["model.layers.0.self_attn.attn_weights"]
    assert w.shape == (1, c.num_attention_heads, 4, 4)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=0, atol=1e-12)  # rows of a softmax
    assert np.all(np.triu(w[0, 0], 1) == 0)                         # causal
    # The embedding is the table row; the act is silu(gate) * up (the input of down_proj).
    np.testing.assert_array_equal(trace["model.embed_tokens"][0, 2], model.params["model.embed_tokens.weight"][42])
    g, u = trace["model.layers.0.mlp.gate_proj"], trace["model.layers.0.mlp.up_proj"]
    np.testing.assert_allclose(trace["model.layers.0.mlp.act"], g / (1 + np.exp(-g)) * u, rtol=1e-12, atol=1e-14)


def test_trace_file_round_trip_keeps_order_dtypes_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    trace = {"z.first": rng.normal(size=(2, 3)), "a.second": rng.normal(size=4).astype(np.float16),
             "m.third": rng.normal(size=(1, 2, 2)).astype(ml_dtypes.bfloat16), "b.fourth": np.float32([1.5])}
    path = tmp_path / "t.safetensors"
    write_trace(path, trace, {"model": "tiny", "dtype": "float64", "ids": [[1, 2]]})
    again, meta = read_trace(path)
    assert list(again) == list(trace)                      # execution order, not safetensors' sorted order
    for name in trace:
        assert again[name].dtype == trace[name].dtype      # float16 / bfloat16 stored as they are
        np.testing.assert_array_equal(again[name], trace[name])
    assert meta["ids"] == [[1, 2]] and meta["model"] == "tiny" and meta["dtype"] == "float64"
    assert meta["package_version"] and meta["order"] == list(trace)


def test_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "t.safetensors"
    with pytest.raises(CheckpointError, match="bad"):
        write_trace(path, {"good": np.zeros(3), "bad": np.array(["x"])})
    assert os.listdir(tmp_path) == []                      # neither the file nor a temporary


def test_damaged_order_metadata_is_a_clear_error(tmp_path):
    from stablelm_ref.checkpoint import save_file

    save_file({"a": np.zeros(2)}, tmp_path / "t.safetensors", {"order": json.dumps(["a", "gone"])})
    with pytest.raises(CheckpointError, match="'gone'"):
        read_trace(tmp_path / "t.safetensors")


def test_relative_error_is_normwise_and_symmetric():
    a = {"x": np.array([[10.0, 0.0], [1e-9, -4.0]])}
    b = {"x": np.array([[10.0, 1e-3], [2e-9, -4.0]])}     # elementwise rel err of x[1,0] would be 0.5
    (row,) = compare_traces(a, b)
    assert row.max_abs == pytest.approx(1e-3, rel=1e-12)
    assert row.max_rel == pytest.approx(1e-4, rel=1e-12)  # 1e-3 / max|x| = 1e-3 / 10
    cos = (100 + 16 + 2e-18) / np.sqrt((116 + 1e-18) * (116 + 1e-6 + 4e-18))
    assert row.cosine == pytest.approx(cos, rel=1e-15)
    assert not row.ok                                      # float64 default rtol 1e-10
    (back,) = compare_traces(b, a)
    assert (back.max_abs, back.max_rel) == (row.max_abs, row.max_rel)
    assert compare_traces(a, b, rtol=1.01e-4)[0].ok and not compare_traces(a, b, rtol=0.99e-4)[0].ok


def test_default_tolerances_follow_the_lower_precision():
    f64, f32, bf16 = np.float64, np.float32, ml_dtypes.bfloat16
    assert default_tolerances(f64, f64) == DEFAULT_TOLERANCES["float64"] == (1e-10, 1e-12)
    assert default_tolerances(f64, f32) == default_tolerances(f32, f32) == DEFAULT_TOLERANCES["float32"]
    assert default_tolerances(bf16, f64) == default_tolerances(bf16, np.float16) == (5e-2, 1e-3)
    assert default_tolerances(np.float16, f32) == (1e-2, 1e-3)
    x = np.linspace(-1, 1, 50)
    # a float32 rounding of a float64 tensor passes as float32 and fails as float64
    assert compare_traces({"x": x.astype(f32)}, {"x": x})[0].ok
    assert not compare_traces({"x": x.astype(f32).astype(f64)}, {"x": x})[0].ok
    # the metadata dtype (a bfloat16 run stored as float32) overrides the tensors' dtype
    rounded = x.astype(bf16).astype(f32)
    assert not compare_traces({"x": rounded}, {"x": x})[0].ok
    assert compare_traces({"x": rounded}, {"x": x}, precision=("bfloat16", None))[0].ok


def test_missing_names_shape_mismatch_and_nan_are_rows_not_crashes():
    a = {"one": np.ones(3), "two": np.ones((2, 3)), "three": np.ones(2), "four": np.array([1.0, np.nan])}
    b = {"one": np.ones(3), "two": np.ones((3, 2)), "four": np.array([1.0, np.nan]), "five": np.zeros(1)}
    rows = compare_traces(a, b)
    assert [r.name for r in rows] == ["one", "two", "three", "four", "five"]
    by = {r.name: r for r in rows}
    assert by["one"].ok and by["one"].max_abs == 0 and by["one"].cosine == 1
    assert not by["two"].ok and by["two"].note == "shape (2, 3) in A, (3, 2) in B"
    assert not by["three"].ok and by["three"].note == "missing in B"
    assert not by["five"].ok and by["five"].note == "missing in A"
    assert not by["four"].ok                               # NaN never agrees
    assert first_divergence(rows) is by["two"]
    assert first_divergence(rows[:1]) is None


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny float64 checkpoint, and a copy with one element of one layer-1 weight moved by 0.05 (std 0.2)."""
    root = tmp_path_factory.mktemp("trace")
    model = tiny_model(seed=11)
    model.save_pretrained(root / "good")
    name = "model.layers.1.self_attn.v_proj.weight"
    model.params[name] = model.params[name].copy()
    model.params[name][3, 7] += 0.05
    model.save_pretrained(root / "bad")
    return root


def _trace(root, model, dtype, out, device="cpu"):
    assert main(["trace", "--model", str(root / model), "--ids", IDS, "--dtype", dtype, "--device", device,
                 "--out", str(root / out)]) == 0
    return root / out


def test_float32_and_float64_traces_compare_clean(checkpoints, capsys):
    a = _trace(checkpoints, "good", "float32", "f32.safetensors")
    b = _trace(checkpoints, "good", "float64", "f64.safetensors")
    trace, meta = read_trace(a)
    assert meta["dtype"] == "float32" and meta["ids"] == [[5, 17, 42, 8, 99, 3]] and meta["producer"] == "stablelm-ref"
    assert trace["lm_head"].dtype == np.float32 and len(trace) == 33
    capsys.readouterr()
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "all 33 tensors agree" in out and ">>" not in out
    rows = compare_traces(trace, read_trace(b)[0])
    assert max(r.max_rel for r in rows) < 1e-5             # measured 1e-6; default float32 rtol is 1e-4
    assert main(["compare", str(a), str(b), "--rtol", "1e-9", "--atol", "0"]) == 1  # but it is float32


def test_perturbed_layer1_weight_first_divergence_in_layer1(checkpoints, capsys):
    good = _trace(checkpoints, "good", "float64", "g64.safetensors")
    bad = _trace(checkpoints, "bad", "float32", "b32.safetensors")
    capsys.readouterr()
    assert main(["compare", str(bad), str(good)]) == 1
    out = capsys.readouterr().out
    marked = [line for line in out.splitlines() if line.startswith(">>")]
    assert len(marked) == 1 and marked[0].split()[1] == "model.layers.1.self_attn.v_proj"
    assert "first divergence: model.layers.1.self_attn.v_proj" in out
    rows = compare_traces(read_trace(bad)[0], read_trace(good)[0])
    assert all(r.ok for r in rows if r.name.startswith("model.layers.0") or r.name == "model.embed_tokens")
    assert not rows[-1].ok                                 # and it reaches the logits


def test_compare_as_a_subprocess(checkpoints):
    good = _trace(checkpoints, "good", "float64", "s64.safetensors")
    bad = _trace(checkpoints, "bad", "float64", "sb64.safetensors")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-m", "stablelm_ref.trace", "compare", str(good), str(bad)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 1, run.stderr
    assert "first divergence: model.layers.1.self_attn.v_proj" in run.stdout
    same = subprocess.run([sys.executable, "-m", "stablelm_ref.trace", "compare", str(good), str(good)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert same.returncode == 0 and "all 33 tensors agree" in same.stdout


def test_bfloat16_on_the_cpu_is_emulated_and_judged_as_bfloat16(checkpoints, capsys):
    bf = _trace(checkpoints, "good", "bfloat16", "bf16.safetensors")
    good = checkpoints / "f64.safetensors"
    if not good.exists():
        good = _trace(checkpoints, "good", "float64", "f64.safetensors")
    trace, meta = read_trace(bf)
    assert meta["dtype"] == "bfloat16" and "emulation" in meta["compute"]
    assert main(["compare", str(bf), str(good)]) == 0                     # within bfloat16's tolerance
    assert main(["compare", str(bf), str(good), "--rtol", "1e-4"]) == 1   # and visibly not float32
    rows = compare_traces(trace, read_trace(good)[0])
    assert 1e-3 < max(r.max_rel for r in rows) < 5e-2


def test_compare_reports_a_missing_tensor(checkpoints, capsys, tmp_path):
    trace, meta = read_trace(_trace(checkpoints, "good", "float64", "m64.safetensors"))
    del trace["model.layers.0.self_attn.attn_weights"]
    write_trace(tmp_path / "partial.safetensors", trace, {"dtype": "float64"})
    assert main(["compare", str(checkpoints / "m64.safetensors"), str(tmp_path / "partial.safetensors")]) == 1
    out = capsys.readouterr().out
    assert "first divergence: model.layers.0.self_attn.attn_weights (missing in B)" in out


def test_cli_user_errors_exit_2(checkpoints, capsys, tmp_path):
    assert main(["trace", "--model", str(checkpoints / "good"), "--ids", "1,x", "--out", str(tmp_path / "t")]) == 2
    assert "--ids" in capsys.readouterr().err
    assert main(["trace", "--model", str(checkpoints / "good"), "--ids", "1,500", "--out", str(tmp_path / "t")]) == 2
    assert "500" in capsys.readouterr().err
    assert main(["trace", "--model", str(checkpoints / "good"), "--text", "hi", "--out", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err.startswith("stablelm-ref: error:")   # no tokenizer files: one line
    assert main(["compare", str(tmp_path / "nope"), str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "t")
    with pytest.raises(SystemExit):
        main(["trace", "--model", "m", "--ids", "1", "--text", "a", "--out", "o"])  # argparse: one of the two


def test_run_with_trace_function_and_method_agree():
    model = tiny_model(seed=3, **VARIANTS["12b"])
    ids, mask = [[4, 5, 6]], [[0, 1, 1]]
    l1, t1 = run_with_trace(model, ids, attention_mask=mask, position_ids=[[0, 0, 1]])
    l2, t2 = StableLmForCausalLM.run_with_trace(model, ids, attention_mask=mask, position_ids=[[0, 0, 1]])
    np.testing.assert_array_equal(l1, l2)
    assert list(t1) == list(t2)
    assert np.all(t1["model.layers.0.self_attn.attn_weights"][..., 1:, 0] == 0)  # real tokens ignore the pad


@pytest.mark.gpu
def test_gpu_traces_compare_clean_against_the_cpu(checkpoints, capsys):
    """Host copies of CuPy arrays: a GPU trace is a file like any other (measured on an H100: float64
    1.9e-15, float32 9.8e-7 of scale)."""
    cupy = pytest.importorskip("cupy")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception:
        pytest.skip("no usable NVIDIA GPU")
    cpu = _trace(checkpoints, "good", "float64", "cpu64.safetensors")
    for dtype, bound in (("float64", 1e-13), ("float32", 1e-5)):
        gpu = _trace(checkpoints, "good", dtype, f"gpu_{dtype}.safetensors", device="gpu")
        trace, meta = read_trace(gpu)
        assert meta["device"] == "gpu" and trace["lm_head"].dtype == np.dtype(dtype)
        assert main(["compare", str(gpu), str(cpu)]) == 0
        assert max(r.max_rel for r in compare_traces(trace, read_trace(cpu)[0])) < bound


def test_a_file_without_order_is_compared_in_the_other_files_order(checkpoints, capsys, tmp_path):
    """A porter's file has no `order` metadata: compare took A's sorted order (lm_head first, layers.10 before
    layers.2), so the first divergence was misplaced. Now B's recorded order decides; alone, order is natural."""
    from stablelm_ref.checkpoint import save_file
    from stablelm_ref.trace import natural_key

    assert sorted(["model.layers.10", "model.layers.2", "lm_head"], key=natural_key) == [
        "lm_head", "model.layers.2", "model.layers.10"]
    assert sorted(["x²", "x2", "x٣", "x10"], key=natural_key) == ["x2", "x10", "x²", "x٣"]  # ASCII digits only
    good = _trace(checkpoints, "good", "float64", "m64.safetensors")
    trace, _ = read_trace(good)
    trace["model.layers.1"] = trace["model.layers.1"] + 1.0       # diverges before model.norm and lm_head
    trace["lm_head"] = trace["lm_head"] + 1.0
    port = tmp_path / "port.safetensors"
    save_file(trace, port)                                        # plain safetensors: no metadata at all
    assert "order" not in read_trace(port)[1]
    assert main(["compare", str(port), str(good)]) == 1
    out = capsys.readouterr().out
    assert "A has no execution order; using B's" in out
    assert out.rstrip().endswith("first divergence: model.layers.1")
    assert out.index("  lm_head ") > out.index("  model.norm ") > out.index("  model.embed_tokens ")  # B's order
    rows = compare_traces(*[read_trace(p)[0] for p in (port, good)], order=read_trace(good)[1]["order"])
    assert first_divergence(rows).name == "model.layers.1"


def test_allow_missing_lists_but_does_not_fail_on_a_tensor_one_side_lacks(checkpoints, capsys, tmp_path):
    """A port under SDPA/flash attention cannot produce attn_weights: compare failed at 'missing in B' forever."""
    trace, meta = read_trace(_trace(checkpoints, "good", "float64", "m64.safetensors"))
    del trace["model.layers.0.self_attn.attn_weights"]
    write_trace(tmp_path / "port.safetensors", trace, {"dtype": "float64"})
    args = [str(checkpoints / "m64.safetensors"), str(tmp_path / "port.safetensors")]
    assert main(["compare", *args, "--allow-missing"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.attn_weights" in out and "missing in B (allowed)" in out
    assert "(1 missing from one side, allowed by --allow-missing)" in out
    trace["model.layers.1"] = trace["model.layers.1"] + 1.0                   # a real divergence still fails
    write_trace(tmp_path / "port.safetensors", trace, {"dtype": "float64"})
    assert main(["compare", *args, "--allow-missing"]) == 1
    assert "first divergence: model.layers.1 " in capsys.readouterr().out
    full, _ = read_trace(args[0])
    rows = compare_traces(full, trace, allow_missing=True)
    assert first_divergence(rows).name == "model.layers.1"
    assert [r.note for r in rows if r.name.endswith("attn_weights")][0] == "missing in B (allowed)"
    assert first_divergence(compare_traces(full, trace)).note == "missing in B"        # the default is unchanged


def test_metadata_a_writer_gets_wrong_is_read_or_named(tmp_path, capsys):
    """A porter's metadata: a flat `ids` list is one row; an unknown `dtype` is a one-line warning (it was
    ignored silently); an `order` naming a tensor the file lacks says how to write order (it said 'damaged')."""
    from stablelm_ref.checkpoint import save_file

    path = tmp_path / "port.safetensors"
    save_file({"a": np.zeros(2)}, path, {"ids": "[5, 17, 42]", "dtype": "fp32"})
    with pytest.warns(UserWarning, match=r"metadata 'dtype' is 'fp32', not one of float64, float32, float16, bf"):
        _, meta = read_trace(path)
    assert meta["ids"] == [[5, 17, 42]]
    assert main(["compare", str(path), str(path)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and err.startswith("stablelm-ref: warning: ") and "'fp32'" in err   # a line a file
    save_file({"a": np.zeros(2)}, path, {"order": json.dumps(["a", "b"])})
    with pytest.raises(CheckpointError) as e:
        read_trace(path)
    assert "metadata 'order' lists 'b', which the file does not hold" in str(e.value)
    assert "JSON list of the names the file holds" in str(e.value) and "damaged" not in str(e.value)


def _documented_shapes(config, t):
    """{name: shape} from docs/tracing.md's name table, for layer 0 of `config` with B=1 and T=S=t."""

    text = open(os.path.join(ROOT, "docs", "tracing.md"), encoding="utf-8").read()
    dims = {"B": 1, "T": t, "S": t, "H": config.num_attention_heads, "KVH": config.num_key_value_heads,
            "D": config.head_dim, "hidden": config.hidden_size, "inter": config.intermediate_size,
            "vocab": config.vocab_size}
    shapes = {}
    for names, shape in re.findall(r"^\| (`[^|]+`) \| \[([^\]]+)\] \|", text, re.M):
        names = re.findall(r"`([^`]+)`", names)
        first = names[0].replace("...", "model.layers.0.").replace("model.layers.i", "model.layers.0")
        prefix = first.rsplit(".", 1)[0] + "." if "." in first else ""
        for name in [first] + [prefix + n for n in names[1:]]:
            shapes[name] = tuple(dims[d.strip()] for d in shape.split(","))
    return shapes


def test_the_docs_name_table_gives_every_shape_of_every_variant(variant):
    """docs/tracing.md gave k_layernorm as [B, H, T, D]; under grouped-query attention it is [B, KVH, T, D]."""
    model = tiny_model(seed=3, **VARIANTS[variant])
    _, trace = model.run_with_trace([[5, 17, 42]])
    documented = _documented_shapes(model.config, 3)
    layer0 = {n: a.shape for n, a in trace.items() if not n.startswith("model.layers.1")}
    assert set(layer0) <= set(documented), set(layer0) - set(documented)
    assert {n: documented[n] for n in layer0} == layer0


def test_padded_query_positions_are_left_out_with_the_attention_mask(tmp_path, capsys):
    """A left-padded batch: a padded query sees no key, its attention row is 0 here and uniform in transformers,
    and every later tensor differs at that position. With the mask (metadata or --mask) those are left out."""
    from stablelm_ref.trace import token_axis

    model = tiny_model(seed=5, **VARIANTS["12b"])
    ids = np.array([[1, 1, 7, 8, 9], [4, 5, 6, 7, 8]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    _, mine = model.run_with_trace(ids, attention_mask=mask, position_ids=np.maximum(np.cumsum(mask, 1) - 1, 0))
    theirs = {}
    for name, a in mine.items():                          # another implementation: other values where padded
        b = a.copy()
        index = [0] + [slice(None)] * (a.ndim - 1)
        index[token_axis(name)] = slice(0, 2)
        b[tuple(index)] = 1.0 / 5 if name.endswith("attn_weights") else b[tuple(index)] + 3.0
        theirs[name] = b
    assert first_divergence(compare_traces(mine, theirs)).name == "model.embed_tokens"
    assert first_divergence(compare_traces(mine, theirs, attention_mask=mask)) is None
    theirs["model.layers.1.mlp.act"][0, 3, 0] += 1.0        # a real token still counts
    assert first_divergence(compare_traces(mine, theirs, attention_mask=mask)).name == "model.layers.1.mlp.act"
    theirs["model.layers.1.mlp.act"][0, 3, 0] -= 1.0
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_trace(a, mine, {"ids": ids.tolist(), "attention_mask": mask.tolist(), "dtype": "float64"})
    write_trace(b, theirs, {"ids": ids.tolist(), "dtype": "float64"})
    assert main(["compare", str(a), str(b)]) == 0
    assert "attention mask from A's metadata: 2 padded positions left out" in capsys.readouterr().out
    write_trace(a, mine, {"dtype": "float64"})
    assert main(["compare", str(a), str(b)]) == 1
    assert main(["compare", str(a), str(b), "--mask", "0,0,1,1,1;1,1,1,1,1"]) == 0
    capsys.readouterr()
    assert main(["compare", str(a), str(b), "--mask", "0,1,1;1,1,1"]) == 2
    assert "the attention mask (--mask) is 2x3, but the traces' tokens are 2x5" in capsys.readouterr().err
    assert main(["compare", str(a), str(b), "--mask", "0,2"]) == 2
    assert "is not an attention mask" in capsys.readouterr().err


@pytest.mark.parametrize("ids", ["1,,2", "1,", ",1", "1_0", "\u0661\u0662", "+1", "1.0", " , "])
def test_ids_and_mask_take_ascii_digits_and_no_empty_item(checkpoints, capsys, tmp_path, ids):
    """--ids (and --mask's rows) are comma-separated ASCII digits: int() alone took '1_0' as 10 and Arabic-Indic
    digits as 12, and an empty item between two commas was dropped, silently."""
    assert main(["trace", "--model", str(checkpoints / "good"), "--ids", ids, "--out", str(tmp_path / "t")]) == 2
    assert "--ids" in capsys.readouterr().err and not os.path.exists(tmp_path / "t")
    m64 = str(_trace(checkpoints, "good", "float64", "m64.safetensors"))
    capsys.readouterr()
    assert main(["compare", m64, m64, "--mask", ids.replace(",", ";", 1)]) == 2
    assert "--mask" in capsys.readouterr().err


def test_ids_with_spaces_around_items_are_read(checkpoints, capsys, tmp_path):
    out = tmp_path / "t.safetensors"
    assert main(["trace", "--model", str(checkpoints / "good"), "--ids", " 1, 2 ,3", "--out", str(out)]) == 0
    assert read_trace(out)[1]["ids"] == [[1, 2, 3]]


def test_text_that_gives_no_tokens_names_the_option(tmp_path, capsys):
    from test_tokenizer import tiny_tokenizer_dir

    d = tmp_path / "m"
    tiny_model(seed=3).save_pretrained(d)
    tiny_tokenizer_dir(d)
    assert main(["trace", "--model", str(d), "--text", "", "--out", str(tmp_path / "t")]) == 2
    assert "--text '' gives no tokens: give some text (or --ids)" in capsys.readouterr().err


@pytest.mark.parametrize("keyword, value", [("rtol", -1), ("atol", float("nan")), ("rtol", "1e-3"), ("atol", math.inf),
                                            ("rtol", True), ("atol", [1e-3])])
def test_a_tolerance_that_is_no_finite_number_at_least_zero_is_refused_by_name(keyword, value):
    """Before: compare_traces(a, a, rtol=-1) or atol=nan judged identical tensors not ok (max_abs 0 <= -1 and
    0 <= nan are False) and rtol="1e-3" was a raw TypeError; the CLI refused these, the API did not."""
    a = {"x": np.arange(6.0).reshape(2, 3)}
    with pytest.raises(StableLmError, match=f"^{keyword}=.*: a tolerance is a finite number >= 0"):
        compare_traces(a, a, **{keyword: value})
    rows = compare_traces(a, a, **{keyword: 0})          # zero and an int are fine: identical tensors agree
    assert [(r.ok, r.max_abs, getattr(r, keyword)) for r in rows] == [(True, 0.0, 0.0)]


@pytest.mark.parametrize("kwargs, match", [
    (dict(allow_missing="no"), "^allow_missing must be True or False, got 'no'"),
    (dict(allow_missing=1), "^allow_missing must be True or False, got 1"),
    (dict(precision="float32"), "^precision must be a pair, .*got 'float32'"),
    (dict(precision=None), "^precision must be a pair"),
    (dict(order="x"), "^order must be a list of tensor names or None; got 'x'"),
    (dict(order=5), "^order must be a list of tensor names"),
])
def test_compare_traces_refuses_arguments_of_the_wrong_kind_by_name(kwargs, match):
    """Before: allow_missing="no" was true (a row missing in B judged ok), precision="float32" was read as the pair
    ("f", "l"), order="x" as the names "x"; precision=None and order=5 were raw TypeErrors."""
    a, b = {"x": np.ones(2), "y": np.ones(2)}, {"x": np.ones(2)}
    with pytest.raises(StableLmError, match=match):
        compare_traces(a, b, **kwargs)
    assert [r.ok for r in compare_traces(a, b, allow_missing=False, precision=["float32", None], order=("y",))] == [
        False, True]                                      # the right kinds: y missing in B (not allowed), x agrees


@pytest.mark.parametrize("a, b, match", [
    ({"x": [[1.0]]}, {"x": np.ones((1, 1))}, "^A's tensor 'x' is a list, not an array: a trace maps names to arrays"),
    ({"x": np.ones((1, 1))}, {"x": None}, "^B's tensor 'x' is a NoneType, not an array"),
    ({"x": np.ones(1)}, {"x": np.ones(1), "y": 2.0}, "^B's tensor 'y' is a float, not an array"),  # missing row too
    ([1], {"x": np.ones(1)}, r"^A is a list, not a trace: give a dict of name -> array"),
    ({"x": np.ones(1)}, None, "^B is a NoneType, not a trace"),
])
def test_a_trace_that_is_no_dict_of_arrays_is_refused_by_name(a, b, match):
    """Before: raw AttributeErrors ('list' object has no attribute 'shape' / 'keys') from inside compare_traces."""
    with pytest.raises(CheckpointError, match=match):
        compare_traces(a, b)


def test_traces_that_share_nothing_are_an_error_not_all_of_nothing_agrees(checkpoints, capsys, tmp_path):
    """A trace compared with a model's weights (hostile review): --allow-missing printed 'all 0 tensors both sides
    hold agree' and exit 0, and without it 139 'missing in B' rows that never said B is no trace. Now exit 2, one
    line; compare_traces refuses the same, as does a comparison of empty tensors only or under an all-padding mask."""
    from stablelm_ref.checkpoint import save_file
    from stablelm_ref.trace import check_comparable

    trace_path = _trace(checkpoints, "good", "float64", "m64.safetensors")
    weights = checkpoints / "good" / "model.safetensors"
    for extra in ([], ["--allow-missing"]):
        capsys.readouterr()
        assert main(["compare", str(trace_path), str(weights), *extra]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1
        assert f"{trace_path} and {weights} share no tensor name: nothing to compare" in captured.err
        assert re.search(r"holds \d+, e\.g\. '[a-z_.0-9]+\.weight', a model's weights, not a trace", captured.err)
    trace, _ = read_trace(trace_path)
    with pytest.raises(CheckpointError, match="^A and B share no tensor name"):
        compare_traces(trace, {"lm_head.weight": np.zeros(3)}, allow_missing=True)
    with pytest.raises(CheckpointError, match="A holds no tensor; B holds 1"):
        compare_traces({}, {"x": np.zeros(3)})
    with pytest.raises(CheckpointError, match="share no tensor that holds a value"):
        compare_traces({"x": np.zeros((1, 0))}, {"x": np.zeros((1, 0))})
    check_comparable({"x": np.zeros(1)}, {"x": np.zeros(1), "y": np.zeros(0)})          # one shared value: fine
    empty = tmp_path / "empty.safetensors"
    save_file({}, empty)
    assert main(["compare", str(empty), str(empty)]) == 2
    assert "holds no tensor" in capsys.readouterr().err
    assert main(["compare", str(trace_path), str(trace_path), "--mask", "0,0,0,0,0,0"]) == 2
    assert "is all padding (no 1), so nothing would be compared" in capsys.readouterr().err


def test_a_row_of_padding_is_traced_and_its_positions_left_out_of_the_comparison(checkpoints, capsys, tmp_path):
    """A batch row that is all padding is a valid input of the model (its queries see no key: output 0), so trace
    records it and compare leaves its positions out while the other rows are compared; only a mask with no token
    at all is refused (the review of the hostile mends: every such row had been refused, a trace file holding one
    could not even be read)."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    model = str(checkpoints / "good")
    for out, dtype in ((a, "float64"), (b, "float32")):
        assert main(["trace", "--model", model, "--dtype", dtype, "--ids", "5,6,7;8,9,10", "--mask", "0,0,0;1,1,1",
                     "--out", str(out)]) == 0
    trace, meta = read_trace(a)
    assert meta["attention_mask"].tolist() == [[0, 0, 0], [1, 1, 1]]
    capsys.readouterr()
    assert main(["compare", str(b), str(a)]) == 0
    assert "3 padded positions left out of every tensor" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="attention_mask is all padding"):
        compare_traces(trace, trace, attention_mask=[[0, 0, 0], [0, 0, 0]])


def test_the_tolerance_header_when_nothing_or_one_tensor_was_compared():
    """Traces of different batch sizes give only shape-mismatch rows: the header said 'none (no tensor compared)
    ( default: ...)' (the review); and one tensor judged at a second precision read 'for 1 tensors'."""
    a = {"x": np.zeros((1, 2)), "y": np.ones(3)}
    rows = compare_traces(a, {"x": np.zeros((2, 2)), "y": np.ones(4)})
    assert tolerance_line(rows, None, None, (None, None), a, a) == "tolerance: none (no tensor compared)"
    b = {"x": np.zeros((1, 2), np.float32), "y": np.ones(3)}
    line = tolerance_line(compare_traces(a, b), None, None, (None, None), a, b).splitlines()[0]
    assert line == ("tolerance: rtol=1e-10, atol=1e-12 for 1 tensor; rtol=0.0001, atol=1e-05 for 1 tensor (float64, "
                    "float32 defaults: the lower precision of A float64 by its tensors' dtypes and B float64/float32 "
                    "by its tensors' dtypes)")


def test_an_empty_path_is_refused_in_words(checkpoints, capsys, tmp_path, monkeypatch):
    """--out '' said 'error: : cannot write (No such file or directory)', and compare '' ': no such file' (hostile
    review): every path the trace commands take is refused by name when empty, as save_pretrained('') is."""
    from stablelm_ref.trace import check_trace_output

    monkeypatch.chdir(tmp_path)
    good = _trace(checkpoints, "good", "float64", "m64.safetensors")
    capsys.readouterr()
    assert main(["trace", "--model", str(checkpoints / "good"), "--ids", "1,2", "--out", ""]) == 2
    assert capsys.readouterr().err.endswith("error: --out is empty (''): give a file name, e.g. trace.safetensors\n")
    for argv in (["compare", "", str(good)], ["compare", str(good), ""]):
        assert main(argv) == 2
        assert "the trace to read is empty (''): give a file name" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=r"^the trace's output path is empty"):
        write_trace("", {"x": np.zeros(1)})
    with pytest.raises(CheckpointError, match=r"^the trace to read must be a path \(a string or os.PathLike\), got None"):
        read_trace(None)
    with pytest.raises(CheckpointError, match="NUL"):
        check_trace_output("a\0b")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("spelling", ["torch.float32", "jnp.float32", "np.float32", "float32"])
def test_the_tolerance_in_force_is_printed_and_framework_dtype_names_are_read(checkpoints, capsys, tmp_path, spelling):
    """A porter's dtype="torch.float32" (what str(torch.float32) gives) got a warning and then float64's 1e-10 for
    tensors stored upcast: '33 of 33 beyond tolerance'; and no header ever said which rtol/atol were used
    (--rtol alone printed 'atol=None'). Now the prefix is read, and the header names each value and its source."""
    from stablelm_ref.checkpoint import save_file

    f64 = _trace(checkpoints, "good", "float64", "m64.safetensors")
    f32, _ = read_trace(_trace(checkpoints, "good", "float32", "t32.safetensors"))
    port = tmp_path / "port.safetensors"
    save_file({n: x.astype(np.float64) for n, x in f32.items()}, port, {"dtype": spelling})   # float32 run, stored wide
    assert read_trace(port)[1]["dtype"] == "float32"
    capsys.readouterr()
    assert main(["compare", str(port), str(f64)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "all 33 tensors agree" in out
    assert ("tolerance: rtol=0.0001, atol=1e-05 (float32 default: the lower precision of A float32 by its dtype "
            "metadata and B float64 by its dtype metadata)") in out
    assert main(["compare", str(port), str(f64), "--rtol", "1e-3"]) == 0
    out = capsys.readouterr().out
    assert "tolerance: rtol=0.001 from --rtol, atol=1e-05 (float32 default" in out and "None" not in out
    assert main(["compare", str(port), str(f64), "--rtol", "1e-9", "--atol", "0"]) == 1
    assert "tolerance: rtol=1e-09 from --rtol, atol=0 from --atol\n" in capsys.readouterr().out
    rows = compare_traces(read_trace(port)[0], read_trace(f64)[0], precision=("torch.float32", None))
    assert all(r.ok and (r.rtol, r.atol) == (1e-4, 1e-5) for r in rows)
    assert all(r.rtol == 1e-10 for r in compare_traces(read_trace(port)[0], read_trace(f64)[0]))  # stored dtypes


def test_an_unknown_dtype_warning_names_the_accepted_spellings(tmp_path):
    from stablelm_ref.checkpoint import save_file

    path = tmp_path / "port.safetensors"
    save_file({"a": np.zeros(2)}, path, {"dtype": "torch.float"})
    with pytest.warns(UserWarning, match=r"'torch.float', not one of float64, float32, float16, bfloat16 \(each also "
                                         r"read with a torch., jnp. or np. prefix: 'torch.float32'\)"):
        _, meta = read_trace(path)
    assert meta["dtype"] == "torch.float"


def test_a_padded_batch_is_traced_from_the_command_line(checkpoints, capsys, tmp_path):
    """The trace command took one unpadded row only (porter review): --ids now takes rows separated by ';' with
    --mask (one parser with compare's --mask), the mask is recorded, and positions are 0..T-1 in every row, as
    run_with_trace without position_ids (transformers' forward)."""
    model = StableLmForCausalLM.from_pretrained(checkpoints / "good", dtype="float64")
    ids, mask = [[1, 1, 7, 8, 9], [4, 5, 6, 7, 8]], [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    out = tmp_path / "padded.safetensors"
    assert main(["trace", "--model", str(checkpoints / "good"), "--ids", "1,1,7,8,9; 4,5,6,7,8",
                 "--mask", "0,0,1,1,1;1,1,1,1,1", "--out", str(out)]) == 0
    assert "attention mask recorded (2 padded positions)" in capsys.readouterr().out
    trace, meta = read_trace(out)
    assert meta["ids"] == ids and meta["attention_mask"].tolist() == mask
    _, expected = model.run_with_trace(ids, attention_mask=mask)
    assert list(trace) == list(expected)
    for name in expected:
        np.testing.assert_array_equal(trace[name], expected[name], err_msg=name)   # the same call: bit for bit
    _, unmasked = model.run_with_trace(ids)
    assert first_divergence(compare_traces(trace, unmasked)) is not None           # the mask was applied
    assert main(["compare", str(out), str(out)]) == 0
    assert "attention mask from A's metadata: 2 padded positions left out" in capsys.readouterr().out
    base = ["trace", "--model", str(checkpoints / "good"), "--out", str(tmp_path / "t.safetensors")]
    for args, message in [
        (["--ids", "1,1,7;4,5"], "--ids rows have different lengths (3, 2): pad the shorter rows"),
        (["--ids", "1,1,7;4,5,6", "--mask", "0,1,1"], "--mask is 1x3 but --ids is 2x3 (rows x ids)"),
        (["--ids", "1,1,7;4,5,6", "--mask", "0,1,1;1,1,"], "--mask '0,1,1;1,1,': give comma-separated 0 or 1s"),
        (["--ids", "1,1,7;4,5,6", "--mask", "0,1,1;1,2,1"], "--mask '0,1,1;1,2,1' is not an attention mask"),
        (["--ids", "1,1,7;", "--mask", "0,1,1"], "--ids '1,1,7;': give comma-separated token ids"),
        (["--text", "hi", "--mask", "1"], "--mask goes with --ids"),
    ]:
        assert main(base + args) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "t.safetensors").exists()


def test_a_decode_step_traced_with_the_cache_matches_the_full_trace_at_its_position(variant):
    """docs/tracing.md's decode-step recipe: the forward's trace= callback with past_key_values. Same math on a
    shorter query: float64 rounding (u = 1.1e-16) through two layers stays far below 1e-12 of scale (measured
    1.0e-15); a wrong cache position or rotary offset would be of order 1."""
    from stablelm_ref.trace import token_axis

    model = tiny_model(seed=5, **VARIANTS[variant])
    ids = np.array([[5, 17, 42, 8, 99, 3], [7, 7, 1, 0, 4, 60]])
    _, full = model.run_with_trace(ids)
    for k in (1, 4):
        prefill = model(ids[:, :-k], use_cache=True)
        step = {}
        model(ids[:, -k:], past_key_values=prefill.past_key_values, trace=lambda n, a: step.update({n: np.asarray(a)}))
        tail = {n: np.take(a, range(6 - k, 6), axis=token_axis(n)) for n, a in full.items()}
        assert list(step) == list(tail)
        assert step["model.layers.0.self_attn.attn_weights"].shape[2:] == (k, 6)            # [B, H, k, S]
        rows = compare_traces(step, tail, rtol=1e-12, atol=0)
        assert first_divergence(rows) is None, first_divergence(rows)


def test_the_docs_python_recipes_run(tmp_path, monkeypatch):
    """The Recording snippet and the decode-step recipe of docs/tracing.md, run as written on the shipped model."""
    import re

    monkeypatch.chdir(tmp_path)
    text = open(os.path.join(ROOT, "docs", "tracing.md"), encoding="utf-8").read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 2 and "past_key_values" in blocks[1]
    namespace = {}
    for block in blocks:
        exec(compile(block, "docs/tracing.md", "exec"), namespace)
    assert len(namespace["step"]) == len(namespace["full"]) > 0


def test_a_shape_mismatch_row_names_the_layout(checkpoints):
    """A porter's k repeated to H heads under GQA, or q in [B, T, H, D], got 'shape (..) in A, (..) in B' and no
    hint (porter review): the row now names the name table's layout (k/v not repeated to H)."""
    model = tiny_model(seed=5, **VARIANTS["12b"])                          # 4 heads, 2 key/value heads
    _, mine = model.run_with_trace([[5, 17, 42]])
    port = dict(mine)
    k = "model.layers.0.self_attn.k_proj"
    port[k] = np.repeat(mine[k], 2, axis=1)                                # repeated to H: [1, 4, 3, 16]
    q = "model.layers.0.self_attn.q_proj"
    port[q] = mine[q].transpose(0, 2, 1, 3)                                # [B, T, H, D]
    by = {r.name: r for r in compare_traces(mine, port)}
    assert by[k].note == ("shape (1, 2, 3, 16) in A, (1, 4, 3, 16) in B; the layout is [B, KVH, T, D] (the "
                          "key/value heads, not repeated to H)")
    assert by[q].note == ("shape (1, 4, 3, 16) in A, (1, 3, 4, 16) in B; the layout is [B, H, T, D] (heads "
                          "before tokens)")
    assert compare_traces({"x": np.zeros(2)}, {"x": np.zeros(3)})[0].note == "shape (2,) in A, (3,) in B"  # no name


def test_every_traced_name_has_the_layout_of_the_docs_table(variant):
    from stablelm_ref.trace import layout

    model = tiny_model(seed=3, **VARIANTS[variant])
    _, trace = model.run_with_trace([[5, 17, 42]])
    documented = _documented_shapes(model.config, 3)
    c = model.config
    dims = {"B": 1, "T": 3, "S": 3, "H": c.num_attention_heads, "KVH": c.num_key_value_heads, "D": c.head_dim,
            "hidden": c.hidden_size, "inter": c.intermediate_size, "vocab": c.vocab_size}
    for name, array in trace.items():
        shape = layout(name).split("]")[0].strip("[").split(", ")
        assert tuple(dims[d] for d in shape) == array.shape, name
        if not name.startswith("model.layers.1"):
            assert documented[name] == array.shape, name
    assert layout("model.layers.0.self_attn.mlp.act") is None and layout("lm_head.weight") is None


def test_python_repr_metadata_is_named_with_how_to_write_json(tmp_path):
    """order = str(list(names)) (single quotes) said 'not valid JSON (...); re-download or fix the file' (porter
    review): a file the porter wrote. For order and attention_mask the message now says how to write them."""
    from stablelm_ref.checkpoint import save_file

    path = tmp_path / "port.safetensors"
    for key, value, how in [("order", str(["a", "b"]), "json.dumps(list(trace))"),
                            ("attention_mask", str(np.array([[0, 1]])), "json.dumps(mask.tolist())"),
                            ("attention_mask", str(((0, 1),)), "json.dumps(mask.tolist())")]:
        save_file({"a": np.zeros(2), "b": np.zeros(1)}, path, {key: value})
        with pytest.raises(CheckpointError) as e:
            read_trace(path)
        assert f"metadata '{key}': not valid JSON (" in str(e.value) and how in str(e.value)
        assert "re-download" not in str(e.value) and "is Python, not JSON" in str(e.value)


def test_the_tokenizer_hint_is_given_only_where_a_tokenizer_gave_the_ids(tmp_path, capsys):
    """--ids 5,17,200 on a 101-id model said '...; does the tokenizer belong to this model?' though no tokenizer
    was involved (porter review): the model's message is plain; --text names the tokenizer, by the rule and the
    message generate and chat use (Tokenizer.check_vocabulary: a tokenizer of more ids than the vocabulary)."""
    from test_tokenizer import tiny_tokenizer_dir

    d = tmp_path / "m"
    tiny_model(seed=3).save_pretrained(d)                 # vocab_size 101
    tiny_tokenizer_dir(d)                                 # 300 ids: 'hello world' gives 293
    out = str(tmp_path / "t.safetensors")
    assert main(["trace", "--model", str(d), "--ids", "5,17,200", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "token id 200 is outside the vocabulary [0, 101) of this model (config.json's vocab_size)" in err
    assert "tokenizer" not in err
    assert main(["trace", "--model", str(d), "--text", "hello world", "--out", out]) == 2
    assert (f"{d}: the tokenizer has 300 ids but the model's vocabulary has 101: they do not belong together; give "
            "the model's own tokenizer") in capsys.readouterr().err           # generate's message (one rule)
    with pytest.raises(Exception, match=r"outside the vocabulary \[0, 101\) of this model \(config.json's "
                                        r"vocab_size\)$"):
        StableLmForCausalLM.from_pretrained(d)([[5, 200]])


def test_python_dash_m_trace_speaks_as_stablelm_ref(checkpoints, capsys, tmp_path):
    """`python -m stablelm_ref.trace` had its own warning hook ('warning: ...') and error prefix ('error: ...') beside
    stablelm-ref's ('stablelm-ref: warning: ...'), and a closed pipe (| head) was a BrokenPipeError traceback:
    both entry points now run through command.run, so the lines are the same."""
    from stablelm_ref import cli
    from stablelm_ref.checkpoint import save_file

    path = tmp_path / "port.safetensors"
    save_file({"a": np.zeros(2)}, path, {"dtype": "fp32"})
    for argv in (["compare", str(path), str(path)], ["trace", "--ids", "1", "--out", ""],
                 ["compare", str(path), str(path), "--allow"]):
        said = []
        for entry in (main, cli.main):
            try:
                code = entry(argv)
            except SystemExit as e:                         # a usage error: argparse exits
                code = e.code
            said.append((code, capsys.readouterr().err))
        assert said[0] == said[1], said
        assert said[0][1].startswith("stablelm-ref: ") and said[0][1].count("\n") in (1, 2)
    assert "did you mean --allow-missing?" in said[0][1]
    good = str(_trace(checkpoints, "good", "float64", "m64.safetensors"))
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run(f"'{sys.executable}' -m stablelm_ref.trace compare '{good}' '{good}' | head -1", shell=True,
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.stdout.startswith("A: ") and run.stderr == "", run.stderr


def test_compare_traces_refuses_a_mask_that_is_not_the_traces_tokens():
    """compare_traces(..., attention_mask=m) in Python ignored a mask of another shape than the traces' [B, T]
    silently (drop_padding returned every tensor whole): it is refused as the CLI refuses it."""
    a = {"model.embed_tokens": np.zeros((2, 5, 4)), "model.layers.0.self_attn.q_proj": np.zeros((2, 3, 5, 4))}
    for mask in ([[1, 1, 1], [1, 1, 1]], np.ones((5, 2))):
        with pytest.raises(CheckpointError, match=r"^attention_mask is \dx\d, but the traces' tokens are 2x5 \(batch x "
                                                  r"tokens, of model.embed_tokens\)"):
            compare_traces(a, a, attention_mask=mask)
    b = {"model.layers.0.self_attn.q_proj": np.zeros((2, 3, 5, 4))}            # no embed_tokens: its token axis
    with pytest.raises(CheckpointError, match=r"tokens are 2x5 \(batch x tokens, of model.layers.0.self_attn.q_proj"):
        compare_traces(b, b, attention_mask=np.ones((2, 3)))
    for mask in ([[1, 1], [1]], [[0.5] * 5] * 2, "1,1"):
        with pytest.raises(CheckpointError, match="is not an attention mask"):
            compare_traces(a, a, attention_mask=mask)
    x = dict(a, **{"model.embed_tokens": np.ones((2, 5, 4))})
    x["model.embed_tokens"][0, :2] = 9.0                                       # differs at padded positions only
    for mask in ([[0, 0, 1, 1, 1], [1] * 5], np.array([[0, 0, 1, 1, 1], [1] * 5], dtype=bool)):
        assert first_divergence(compare_traces(x, dict(a, **{"model.embed_tokens": np.ones((2, 5, 4))}),
                                               attention_mask=mask)) is None


def test_compares_warnings_are_warnings_in_the_one_form(checkpoints, capsys, tmp_path):
    """compare printed 'warning: ... different input ids' among its report on stdout, a third form beside the
    runner's 'stablelm-ref: warning:' lines on stderr: it is now one of those."""
    a = _trace(checkpoints, "good", "float64", "m64.safetensors")
    b = tmp_path / "other.safetensors"
    assert main(["trace", "--model", str(checkpoints / "good"), "--ids", "5,17,42,8,99,4", "--out", str(b)]) == 0
    capsys.readouterr()
    assert main(["compare", str(a), str(b)]) == 1
    out, err = capsys.readouterr()
    assert err == "stablelm-ref: warning: the two traces were recorded from different input ids\n"
    assert "warning:" not in out


def test_positions_from_the_mask_diverge_first_at_rotary_q():
    """docs/tracing.md: positions derived from the mask on one side only diverge at the first rotary_q, even with
    the padded positions left out (the rows that are not padded have the same positions on both sides)."""
    model = tiny_model(seed=11)
    ids, mask = np.array([[1, 1, 7, 8, 9], [4, 5, 6, 7, 8]]), np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    _, default = model.run_with_trace(ids, attention_mask=mask)
    _, derived = model.run_with_trace(ids, attention_mask=mask, position_ids=np.maximum(np.cumsum(mask, 1) - 1, 0))
    first = first_divergence(compare_traces(default, derived, attention_mask=mask))
    assert first.name == "model.layers.0.self_attn.rotary_q" and first.max_rel > 0.1        # measured 0.83
    np.testing.assert_array_equal(default["lm_head"][1], derived["lm_head"][1])              # the unpadded row
