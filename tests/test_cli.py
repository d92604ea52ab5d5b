"""The stablelm-ref command: real subprocesses for the end-to-end runs and the exit-code contract, main()
in-process for the many error messages (same code path, without a Python start-up per case)."""

import json
import os
import subprocess
import sys

import pytest

from stablelm_ref import cli, command, hub
from stablelm_ref.heads import StableLmForCausalLM
from stablelm_ref.tokenizer import Tokenizer

from conftest import tiny_model
from test_tokenizer import tiny_tokenizer_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_model_dir(path, chat_template=True, **overrides):
    model = tiny_model(seed=5, dtype="float32", **{"vocab_size": 320, "max_position_embeddings": 256, **overrides})
    model.save_pretrained(path)
    kw = {} if chat_template else {"chat_template": None}
    tiny_tokenizer_dir(path, **kw)
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"))


def run(*args, stdin=None, env=None):
    full_env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run([sys.executable, "-m", "stablelm_ref.cli", *args], input=stdin, capture_output=True,
                          text=True, env=full_env, timeout=120)


def expected_text(model_dir, prompt, n):
    model = StableLmForCausalLM.from_pretrained(model_dir)
    tok = Tokenizer.from_pretrained(model_dir)
    ids = tok(prompt)["input_ids"]
    out = model.generate(ids, max_new_tokens=n, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0], skip_special_tokens=True)


# ---- subprocesses --------------------------------------------------------------------------------

def test_generate_streams_the_greedy_text_and_prints_stats(model_dir):
    r = run("generate", "--model", model_dir, "--max-new-tokens", "12", "--stats", "The weather is")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected_text(model_dir, "The weather is", 12) + "\n"
    assert r.stdout.startswith("The weather is")
    stats = [line for line in r.stderr.splitlines() if line.startswith("prefill:")]
    assert len(stats) == 1 and stats[0].count("tokens/s") == 2, r.stderr


def test_bad_input_is_one_line_and_exit_2_in_a_real_process(model_dir):
    r = run("generate", "--model", model_dir, "--top-p", "1.5", "hello")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--top-p must be a number in (0, 1], got 1.5" in r.stderr
    assert "Traceback" not in r.stderr


def test_offline_without_cache_in_a_real_process(tmp_path):
    r = run("generate", "--model", "acme/not-cached", "hi",
            env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "acme/not-cached is not in the local Hugging Face cache" in r.stderr
    assert "huggingface-cli download acme/not-cached --include '*.safetensors' '*.json'" in r.stderr


def test_chat_runs_a_conversation(model_dir):
    r = run("chat", "--model", model_dir, "--max-new-tokens", "5", "--system", "Be brief.",
            stdin="Hello\nWhat is the weather?\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 2  # one streamed reply per user turn


def test_help_everywhere():
    for args in ([], ["generate"], ["chat"]):
        r = run(*args, "--help")
        assert r.returncode == 0 and "usage: stablelm-ref" in r.stdout
    assert "--max-new-tokens" in r.stdout and "--system" in r.stdout
    assert "the embedded default model has no chat template" in " ".join(r.stdout.split()), r.stdout
    r = run("trace", "--help")
    assert "cpu (NumPy) or gpu (CuPy)" in " ".join(r.stdout.split())      # every option has a help text


# ---- in-process: the messages --------------------------------------------------------------------

def main(capsys, *argv):
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_generation_matches_in_process_and_sampling_is_seeded(model_dir, capsys):
    code, out, _ = main(capsys, "generate", "--model", model_dir, "--max-new-tokens", "6", "def fibonacci(n):")
    assert code == 0 and out == expected_text(model_dir, "def fibonacci(n):", 6) + "\n"
    a = main(capsys, "generate", "--model", model_dir, "--temperature", "1.5", "--seed", "3", "x")
    b = main(capsys, "generate", "--model", model_dir, "--temperature", "1.5", "--seed", "3", "x")
    assert a == b and a[0] == 0
    greedy = main(capsys, "generate", "--model", model_dir, "--temperature", "0", "--max-new-tokens", "6",
                  "def fibonacci(n):")
    assert greedy[1] == out


def _variants(tmp_path):
    """Broken model directories, each with the message it must produce."""
    def not_stablelm(d):
        cfg = json.load(open(os.path.join(d, "config.json")))
        json.dump({**cfg, "model_type": "llama"}, open(os.path.join(d, "config.json"), "w"))

    def corrupt(d):
        with open(os.path.join(d, "model.safetensors"), "r+b") as f:
            f.truncate(200)

    def no_config(d):
        os.remove(os.path.join(d, "config.json"))

    def no_tokenizer(d):
        os.remove(os.path.join(d, "tokenizer.json"))

    return {"model_type": not_stablelm, "truncated": corrupt, "config.json": no_config,
            "no tokenizer.json": no_tokenizer}


@pytest.mark.parametrize("case", ["model_type", "truncated", "config.json", "no tokenizer.json"])
def test_broken_model_directories(tmp_path, capsys, case):
    d = make_model_dir(tmp_path / "m")
    _variants(tmp_path)[case](d)
    code, _, err = main(capsys, "generate", "--model", d, "hi")
    assert code == 2 and err.count("\n") == 1 and err.startswith("stablelm-ref: error: "), err
    assert case in err


def test_tokenizer_larger_than_model_vocabulary(tmp_path, capsys):
    d = make_model_dir(tmp_path / "m", vocab_size=200)
    code, _, err = main(capsys, "generate", "--model", d, "hi")
    assert code == 2 and "the tokenizer has 300 ids but the model's vocabulary has 200" in err


@pytest.mark.parametrize("args, match", [
    (["--temperature", "-1"], "--temperature must be a number > 0, got -1.0 (0 is greedy decoding)"),
    (["--temperature", "inf"], "--temperature must be a number > 0, got inf"),
    (["--top-k", "-3"], "--top-k must be an integer >= 0 (0 turns it off), got -3"),
    (["--top-p", "0"], "--top-p must be a number in (0, 1], got 0.0"),
    (["--top-p", "nan"], "--top-p must be a number in (0, 1], got nan"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
    (["--repetition-penalty", "-2"], "--repetition-penalty must be a number > 0 (1.0 turns it off), got -2.0"),
    (["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
    (["--max-new-tokens", "abc"], "invalid int value: 'abc'"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    (["--dtype", "bfloat16"], "dtype bfloat16 is for the GPU"),
])
def test_invalid_values(model_dir, capsys, args, match):
    code, _, err = main(capsys, "generate", "--model", model_dir, *args, "The weather is")
    assert code == 2 and err.count("\n") == 1 and match in err, err


def test_option_values_are_checked_before_the_model_loads(tmp_path, capsys):
    """Fail fast: a bad value is reported even where --model names nothing that exists."""
    code, _, err = main(capsys, "generate", "--model", str(tmp_path / "absent"), "--top-k", "-1", "hi")
    assert code == 2 and "--top-k must be an integer >= 0" in err and "absent" not in err, err


def test_cli_temperature_zero_is_greedy_where_generate_refuses_it():
    """The CLI and generate share one set of value rules (generation.check_values); the one value where
    their audiences differ is a temperature of 0: greedy decoding on the command line, an error for
    generate (which takes do_sample=False for that). Negative and non-finite temperatures fail in both."""
    from stablelm_ref.errors import GenerationError
    from stablelm_ref.generation import check_values

    args = cli.build_parser().parse_args(["generate", "x"])
    args.temperature = 0.0
    command.check_arguments(args)
    with pytest.raises(GenerationError, match="temperature must be a number > 0"):
        check_values({"temperature": 0.0})
    for bad in (-1.0, float("inf"), float("nan")):
        args.temperature = bad
        with pytest.raises(GenerationError, match="--temperature"):
            command.check_arguments(args)
        with pytest.raises(GenerationError, match="temperature"):
            check_values({"temperature": bad})


def test_prompt_longer_than_max_position_embeddings(model_dir, capsys):
    code, _, err = main(capsys, "generate", "--model", model_dir, "--max-new-tokens", "1", "The weather " * 200)
    assert code == 2 and err.count("\n") == 1
    assert "more than the model's context (max_position_embeddings = 256); shorten the prompt" in err


def test_missing_directory_and_default_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = main(capsys, "generate", "--model", str(tmp_path / "nope" / "model"), "hi")
    assert code == 2 and "no such local directory" in err
    monkeypatch.setattr(hub, "DEFAULT_MODEL_DIR", str(tmp_path))
    code, _, err = main(capsys, "generate", "hi")
    assert code == 2 and err == (f"stablelm-ref: error: the embedded default model is missing ({tmp_path} has no "
                                 "config.json): restore it (in a checkout: git checkout -- stablelm_ref/default_model; "
                                 "installed as a package: pip install --force-reinstall stablelm-ref), or give a model "
                                 "directory or Hub repo id (--model DIR_OR_REPO on the command line)\n")


def test_chat_without_template(tmp_path, capsys):
    d = make_model_dir(tmp_path / "m", chat_template=False)
    code, _, err = main(capsys, "chat", "--model", d)
    assert code == 2 and "has no chat template" in err


def test_subcommands_can_be_added_by_other_modules(monkeypatch, capsys):
    import types

    mod = types.ModuleType("stablelm_ref_fake_cmd")

    def add_cli_commands(subparsers):
        p = subparsers.add_parser("hello")
        p.set_defaults(func=lambda args: print("hi") or 0)

    mod.add_cli_commands = add_cli_commands
    monkeypatch.setitem(sys.modules, "stablelm_ref_fake_cmd", mod)
    monkeypatch.setattr(cli, "COMMAND_MODULES", cli.COMMAND_MODULES + ["stablelm_ref_fake_cmd"])
    assert main(capsys, "hello")[:2] == (0, "hi\n")


def test_default_model_is_used_when_present(tmp_path, capsys, monkeypatch):
    d = make_model_dir(tmp_path / "default")
    monkeypatch.setattr(hub, "DEFAULT_MODEL_DIR", d)
    code, out, _ = main(capsys, "generate", "--max-new-tokens", "4", "The weather")
    assert code == 0 and out == expected_text(d, "The weather", 4) + "\n"


@pytest.mark.parametrize("argv", [("generate", "--max-new-token", "4", "x"),      # --max-new-tokens
                                  ("generate", "--temp", "0.5", "x"),             # --temperature
                                  ("trace", "--id", "1", "--out", "o.safetensors")])  # --ids
def test_abbreviated_options_are_refused(argv, capsys):
    """argparse would take a unique prefix for the whole option (allow_abbrev); a typo must not pass."""
    code, out, err = main(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert (f"unrecognized arguments: {argv[1]} " in err if argv[0] == "generate"
            else "one of the arguments --ids --text is required" in err), err
    full = {"--max-new-token": "--max-new-tokens", "--temp": "--temperature", "--id": "--ids"}[argv[1]]
    assert f"{argv[1]} is not an option (options are spelled in full): did you mean {full}?" in err, err


@pytest.mark.parametrize("argv, first", [
    (("trace", "--id", "1", "--out", "o.safetensors"), "one of the arguments --ids --text is required"),
    (("trace", "--id", "1", "--text", "hi"), "the following arguments are required: --out"),
    (("generate", "--max-new-tok"), "the following arguments are required: PROMPT"),
    (("--vers",), "the following arguments are required: COMMAND"),
])
def test_an_abbreviation_is_named_whatever_usage_error_argparse_reports_first(argv, first, capsys):
    """argparse reports a missing argument before the unrecognized ones, and its message was then all a user saw:
    `trace --id 1 --out o` said only that --ids or --text is required. The hint now comes with any usage error."""
    code, out, err = main(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1
    full = {"--id": "--ids", "--max-new-tok": "--max-new-tokens", "--vers": "--version"}
    typed = next(a for a in argv if a in full)
    assert f"{first}; {typed} is not an option (options are spelled in full): did you mean {full[typed]}? (see" \
        in err, err


def test_an_argument_after_the_double_dash_gets_no_hint(capsys):
    """After `--` every argument is a value (here the prompt "--temp"): the hint, now given with any usage error
    from all the typed arguments, must not take it for an abbreviated --temperature."""
    code, _, err = main(capsys, "generate", "--", "--temp", "x")
    assert code == 2 and "unrecognized arguments: x (see" in err and "did you mean" not in err, err


def test_an_unknown_option_that_abbreviates_none_gets_no_hint(capsys):
    code, _, err = main(capsys, "generate", "--bogus", "4", "x")
    assert code == 2 and "unrecognized arguments: --bogus x (see" in err and "did you mean" not in err


@pytest.mark.parametrize("argv, code, expected", [
    (["--version"], 0, "stablelm-ref "),
    (["generate", "--temp", "1", "hi"], 2, "--temp is not an option (options are spelled in full): did you mean "
                                           "--temperature?"),
])
def test_main_takes_its_arguments_as_any_iterable(capsys, argv, code, expected):
    """main(argv) passes argv to argparse, which takes any iterable; the parser now also keeps the arguments for
    its hints, and reading a generator for them left argparse nothing: main(iter(['--version'])) said that COMMAND
    is required. The arguments are read once, for both."""
    with pytest.raises(SystemExit) as info:                      # argparse exits, for --version too
        cli.main(a for a in argv)
    out, err = capsys.readouterr()
    assert info.value.code == code and expected in (out if code == 0 else err), (info.value.code, out, err)


def test_trace_defaults_to_the_embedded_model(tmp_path, capsys, monkeypatch):
    import numpy as np

    from stablelm_ref.trace import read_trace, run_with_trace

    d = make_model_dir(tmp_path / "default")
    monkeypatch.setattr(hub, "DEFAULT_MODEL_DIR", d)
    out_file = str(tmp_path / "t.safetensors")
    code, out, err = main(capsys, "trace", "--ids", "5,6,7", "--dtype", "float32", "--out", out_file)
    assert code == 0, err
    trace, meta = read_trace(out_file)
    assert meta["model"] == hub.DEFAULT_MODEL and meta["ids"] == [[5, 6, 7]]
    logits, expected = run_with_trace(StableLmForCausalLM.from_pretrained(d), [[5, 6, 7]])
    np.testing.assert_array_equal(trace["lm_head"], logits)     # the same model, the same float32 forward
    assert list(trace) == list(expected)
    code, _, err = main(capsys, "trace", "--text", "The weather", "--dtype", "float32", "--out", out_file)
    assert code == 0, err
    assert read_trace(out_file)[1]["ids"] == [Tokenizer.from_pretrained(d).encode("The weather")]


# ---- the model's generation_config.json: options override it as generate's keywords do -----------

def _cli_expected(model_dir, prompt, **kwargs):
    model = StableLmForCausalLM.from_pretrained(model_dir)
    tok = Tokenizer.from_pretrained(model_dir)
    out = model.generate(tok(prompt)["input_ids"], **kwargs)
    return tok.decode(out[0], skip_special_tokens=True) + "\n"


def test_options_not_given_leave_the_generation_config_in_charge(tmp_path, capsys):
    d = make_model_dir(tmp_path)
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [0, 300], "pad_token_id": 1, "do_sample": True, "temperature": 0.7, "top_k": 10,
                   "max_new_tokens": 5}, f)
    code, out, err = main(capsys, "generate", "--model", d, "--seed", "3", "The weather is")
    assert code == 0, err
    assert out == _cli_expected(d, "The weather is", seed=3)            # the file's settings, nothing else
    assert out == _cli_expected(d, "The weather is", seed=3, eos_token_id=[0, 300], do_sample=True,
                                temperature=0.7, top_k=10, max_new_tokens=5)
    # options win, each on its own: length, greedy, another temperature
    assert main(capsys, "generate", "--model", d, "--seed", "3", "--max-new-tokens", "9", "The weather is")[1] == \
        _cli_expected(d, "The weather is", seed=3, max_new_tokens=9)
    assert main(capsys, "generate", "--model", d, "--temperature", "0", "The weather is")[1] == \
        _cli_expected(d, "The weather is", do_sample=False)
    assert main(capsys, "generate", "--model", d, "--temperature", "1.5", "--seed", "1", "The weather is")[1] == \
        _cli_expected(d, "The weather is", seed=1, temperature=1.5)


def test_without_a_length_anywhere_the_cli_generates_64_tokens(model_dir, capsys):
    code, out, _ = main(capsys, "generate", "--model", model_dir, "--temperature", "0", "The weather is")
    assert code == 0 and out == expected_text(model_dir, "The weather is", 64) + "\n"


@pytest.mark.parametrize("model", ["DIR", None])
def test_revision_with_a_local_model_is_an_error_naming_the_option(model_dir, capsys, model):
    """--revision with a local directory (or the default model) was ignored silently: the files loaded were
    whatever the directory held, not the revision asked for."""
    argv = ["generate", "--revision", "v2.0", "hi"] + (["--model", model_dir] if model else [])
    code, out, err = main(capsys, *argv)
    what = f"--model {model_dir} (a local directory)" if model else "the embedded default model"
    assert code == 2 and out == "" and err == (f"stablelm-ref: error: --revision v2.0 selects a commit of a Hub "
                                               f"repository, but {what} is not one; drop --revision, or give --model "
                                               "a Hub repo id\n")


def test_chat_whose_template_renders_nothing_names_the_template(tmp_path, capsys, monkeypatch):
    """A chat template that renders no tokens: the error names tokenizer_config.json's chat_template, not the
    user's turn ('input_ids is empty' before)."""
    import io

    d = make_model_dir(tmp_path / "m")
    tiny_tokenizer_dir(d, chat_template="{% if false %}x{% endif %}")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    code, _, err = main(capsys, "chat", "--model", d)
    assert code == 2 and "the chat template rendered no tokens for this conversation; check tokenizer_config.json's" \
        " 'chat_template'" in err, err


def test_the_abbreviation_hint_names_the_typed_commands_options_only(capsys):
    """The hint listed the options of every subcommand (generate --sys suggested chat's --system): argparse's
    top-level error does not know the subcommand typed; the parser now remembers it."""
    for argv, hint in [(["generate", "--sys", "x", "hi"], None), (["chat", "--sys", "x"], "--system"),
                       (["generate", "--mas", "1", "hi"], None), (["compare", "a", "b", "--mas", "1"], "--mask"),
                       (["generate", "--top", "5", "hi"], "--top-k or --top-p")]:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1
        if hint is None:
            assert "did you mean" not in err, err
        else:
            assert f"did you mean {hint}?" in err, err


def test_help_says_which_options_turn_sampling_on_and_lists_every_command(capsys):
    """A newcomer's --top-k 5 turned unseeded sampling on; the rule was only in cli.py's docstring. The top-level
    help said 'generate text from the command line' though chat, trace and compare are there too."""
    import argparse

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("generate", "chat"):
        helps = {a.dest: " ".join(a.help.split()) for a in sub.choices[command]._actions}
        for dest in ("top_k", "top_p", "temperature"):
            assert "turns sampling on" in helps[dest] and "add --seed to reproduce" in helps[dest], (dest, helps[dest])
        args = parser.parse_args([command, "--top-k", "5"] + (["hi"] if command == "generate" else []))
        assert args.seed is None
    top = " ".join(parser.format_help().split())
    for command in ("(generate)", "(chat)", "(trace)", "(compare)"):
        assert command in top
    assert "stablelm-ref COMMAND --help for each command's options." in top


@pytest.mark.parametrize("option", [["--top-k", "5"], ["--top-p", "0.9"], ["--temperature", "0.7"], ["--sample"]])
def test_the_options_the_help_names_do_turn_sampling_on(option):
    """The help's claim, checked against what the command passes to generate (do_sample=True, no seed)."""
    class Tok:
        eos_token_id = pad_token_id = None

    class Model:
        from stablelm_ref.generation_config import GenerationConfig as _G
        generation_config = _G()

    args = cli.build_parser().parse_args(["generate", *option, "hi"])
    kwargs = cli.generation_kwargs(args, Tok(), Model())
    assert kwargs["do_sample"] is True and kwargs["seed"] is None
    args = cli.build_parser().parse_args(["generate", "--temperature", "0", "hi"])
    assert cli.generation_kwargs(args, Tok(), Model())["do_sample"] is False
