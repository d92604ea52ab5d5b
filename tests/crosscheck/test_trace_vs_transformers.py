"""A transformers trace (tools/trace_transformers.py) against stablelm-ref's float64 trace, name by name.

Skipped without torch and transformers (make crosscheck installs them).
"""

import importlib.util
import os
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from stablelm_ref.trace import compare_traces, first_divergence, main, read_trace  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from conftest import VARIANTS, tiny_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "trace_transformers.py")
IDS = [[5, 17, 42, 8, 99, 3, 61, 0]]


def _tool():
    spec = importlib.util.spec_from_file_location("trace_transformers", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tt():
    return _tool()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{variant: (model directory, our float64 model)}."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, overrides in VARIANTS.items():
        model = tiny_model(seed=21, **overrides)
        model.save_pretrained(root / name)
        out[name] = (root / name, model)
    return out


def test_float32_transformers_trace_compares_clean_against_our_float64(tt, saved, variant):
    directory, ours = saved[variant]
    _, mine = ours.run_with_trace(IDS)
    logits, theirs = tt.trace_transformers(tt.load_transformers_model(directory, "float32"), IDS)
    assert list(theirs) == list(mine)                       # every name, in the same execution order
    rows = compare_traces(mine, theirs)                     # default tolerance for float32: rtol 1e-4
    assert first_divergence(rows) is None, rows
    assert max(r.max_rel for r in rows) < 1e-5              # measured <= 2e-6
    np.testing.assert_array_equal(logits, theirs["lm_head"])


def test_exact_float64_transformers_trace_agrees_to_rounding(tt, saved, variant):
    directory, ours = saved[variant]
    _, mine = ours.run_with_trace(IDS)
    _, theirs = tt.trace_transformers(tt.load_transformers_model(directory, "float64"), IDS, exact=True)
    rows = compare_traces(mine, theirs)                     # float64 default: rtol 1e-10
    assert first_divergence(rows) is None, rows
    assert max(r.max_rel for r in rows) < 1e-13             # measured <= 3.5e-15


def test_plain_float64_transformers_diverges_first_at_rotary(tt, saved, variant):
    """transformers' float64 mode builds the rotary tables (and the softmax) in float32: the tool
    finds exactly that, and nothing before it."""
    directory, ours = saved[variant]
    _, mine = ours.run_with_trace(IDS)
    _, theirs = tt.trace_transformers(tt.load_transformers_model(directory, "float64"), IDS)
    rows = compare_traces(mine, theirs)
    assert first_divergence(rows).name == "model.layers.0.self_attn.rotary_q"
    assert all(r.max_rel < 1e-13 for r in rows[:[r.name for r in rows].index("model.layers.0.self_attn.rotary_q")])
    assert first_divergence(compare_traces(mine, theirs, rtol=1e-6)) is None  # float32-sized, no more


def test_left_padded_batch(tt, saved):
    directory, ours = saved["12b"]
    ids = np.array([[1, 1, 7, 8, 9], [4, 5, 6, 7, 8]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    _, mine = ours.run_with_trace(ids, attention_mask=mask, position_ids=pos)
    _, theirs = tt.trace_transformers(tt.load_transformers_model(directory, "float64"), ids, mask, pos, exact=True)
    # Padded query rows hold no token; compare the real positions only (row 0 from column 2, row 1 all).
    for name, a in mine.items():
        b = theirs[name]
        t_axis = 1 if a.ndim == 3 else 2
        for row, start in ((0, 2), (1, 0)):
            x, y = np.take(a[row], range(start, 5), axis=t_axis - 1), np.take(b[row], range(start, 5), axis=t_axis - 1)
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-10 * max(np.abs(y).max(), 1), err_msg=name)
    # compare itself: whole tensors show a false divergence at the padded query rows; with the mask, none
    assert first_divergence(compare_traces(mine, theirs)).name == "model.layers.0.self_attn.attn_weights"
    assert first_divergence(compare_traces(mine, theirs, attention_mask=mask)) is None


def test_the_tool_command_line_and_compare(tt, saved, tmp_path, capsys):
    directory, _ = saved["1_6b"]
    ids = ",".join(map(str, IDS[0]))
    hf = tmp_path / "hf.safetensors"
    assert tt.main(["--model", str(directory), "--ids", ids, "--out", str(hf)]) == 0  # in-process: torch loads once
    trace, meta = read_trace(hf)
    assert meta["producer"].startswith("transformers") and meta["dtype"] == "float32" and meta["ids"] == IDS
    assert trace["lm_head"].dtype == np.float32
    ours = tmp_path / "ours.safetensors"
    assert main(["trace", "--model", str(directory), "--ids", ids, "--dtype", "float64", "--out", str(ours)]) == 0
    capsys.readouterr()
    assert main(["compare", str(ours), str(hf)]) == 0
    assert "all 33 tensors agree" in capsys.readouterr().out


def test_the_tool_loads_safetensors_only_and_speaks_in_one_line(tt, saved, tmp_path, capsys):
    """Hostile input for the tool: a directory holding only pytorch_model.bin was unpickled by transformers
    (only safetensors may ever be loaded); an id outside the vocabulary was an IndexError inside torch; an
    --out naming the model's weights or an unwritable path was a traceback after the whole run. Each is now
    one 'error:' line and exit 2, and nothing is written."""
    import shutil

    import torch
    from safetensors.numpy import load_file

    directory, _ = saved["3b"]
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(directory / "config.json", pickled)
    weights = load_file(str(directory / "model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, pickled / "pytorch_model.bin")
    weights_before = (directory / "model.safetensors").read_bytes()
    for args, message in [
        (["--model", str(pickled), "--ids", "1,2"], "pickle format that runs code when opened; it is refused"),
        (["--model", str(directory), "--ids", "1,100000"], "token id 100000 is outside the vocabulary"),
        (["--model", str(directory), "--ids", "1,2", "--out", str(directory / "model.safetensors")],
         "is not a stablelm-ref trace"),
        (["--model", str(directory), "--ids", "1,2", "--out", str(tmp_path / "no" / "t.safetensors")],
         "cannot write"),
        (["--model", "", "--ids", "1,2"], "--model is empty (''): give a model directory"),
        (["--model", str(directory), "--ids", "1,2", "--out", ""], "--out is empty (''): give a file name"),
    ]:
        if "--out" not in args:
            args = args + ["--out", str(tmp_path / "t.safetensors")]
        assert tt.main(args) == 2
        last = capsys.readouterr().err.splitlines()[-1]          # after transformers' loading progress bar
        assert last.startswith("error: ") and message in last
    assert (directory / "model.safetensors").read_bytes() == weights_before
    assert not (tmp_path / "t.safetensors").exists()


def test_a_model_loaded_without_the_tool_is_traced_in_full_and_left_as_it_was(tt, saved):
    """trace_transformers() on a model from transformers' own from_pretrained (sdpa attention, porter review)
    silently recorded no rotary_q/rotary_k/attn_weights/attn_output: the docs said every name is recorded. The
    tracing attention is now switched in for the call (and back), and a pass that misses names is an error."""
    import torch
    import transformers

    directory, ours = saved["12b"]
    _, mine = ours.run_with_trace(IDS)
    model = transformers.StableLmForCausalLM.from_pretrained(directory, dtype=torch.float64, use_safetensors=True,
                                                             attn_implementation="sdpa")
    model.train()
    _, theirs = tt.trace_transformers(model, IDS, exact=True)
    assert list(theirs) == list(mine)
    assert first_divergence(compare_traces(mine, theirs)) is None           # float64 --exact: rtol 1e-10
    assert model.config._attn_implementation == "sdpa" and model.training    # as it was
    _, loaded = tt.trace_transformers(tt.load_transformers_model(directory, "float64"), IDS, exact=True)
    for name in mine:
        np.testing.assert_array_equal(theirs[name], loaded[name], err_msg=name)  # the same code ran

    from transformers.models.stablelm import modeling_stablelm as ms

    def unrecorded(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        return ms.eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    original = tt._attention
    tt._attention = unrecorded                         # an attention function that records nothing
    try:
        with pytest.raises(tt.StableLmError, match=r"recorded no model\.layers\.0\.self_attn\.rotary_q \(8 attention "
                                                   r"names missing\).*trace a StableLmForCausalLM as transformers ships it"):
            tt.trace_transformers(model, IDS)
    finally:
        tt._attention = original
        tt._register_attention()
    with pytest.raises(tt.StableLmError, match="got a LlamaForCausalLM .*load_transformers_model"):
        tt.trace_transformers(transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)), IDS)


def test_a_padded_batch_from_both_command_lines_compares_clean(tt, saved, tmp_path, capsys):
    """--ids rows and --mask in both tools (porter review): both record the mask and use positions 0..T-1, so
    compare (mask from the metadata) agrees at float64 --exact; without the mask the padded rows diverge."""
    directory, _ = saved["12b"]
    ids, mask = "1,1,7,8,9;4,5,6,7,8", "0,0,1,1,1;1,1,1,1,1"
    hf, ours = tmp_path / "hf.safetensors", tmp_path / "ours.safetensors"
    assert tt.main(["--model", str(directory), "--ids", ids, "--mask", mask, "--dtype", "float64", "--exact",
                    "--out", str(hf)]) == 0
    assert main(["trace", "--model", str(directory), "--ids", ids, "--mask", mask, "--out", str(ours)]) == 0
    assert read_trace(hf)[1]["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    capsys.readouterr()
    assert main(["compare", str(ours), str(hf)]) == 0
    assert "attention mask from A's metadata: 2 padded positions left out" in capsys.readouterr().out
    rows = compare_traces(read_trace(ours)[0], read_trace(hf)[0])
    assert first_divergence(rows).name == "model.layers.0.self_attn.attn_weights"    # the padded query rows
