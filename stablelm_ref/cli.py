"""The stablelm-ref command: generate text from a prompt, or chat, with a local or Hub model.

    stablelm-ref generate [--model DIR_OR_REPO] [--max-new-tokens N] [--temperature T] [--top-k K]
                          [--top-p P] [--seed S] [--dtype float32|float64|bfloat16] [--device cpu|gpu]
                          [--stats] PROMPT
    stablelm-ref chat [--model DIR_OR_REPO] [--system TEXT] ...        (reads user turns from stdin)
    stablelm-ref trace / compare ...                                     (trace.py: golden-reference checks)

Without --model the embedded default model (stablelm_ref/default_model/, named "stablelm-ref:default")
is used. Options not given are not passed to generate, so the model's generation_config.json decides them as
it does for generate (greedy, 64 new tokens and the tokenizer's eos/pad ids when neither sets them); a
temperature > 0, --top-k, --top-p or --sample turns sampling on, --temperature 0 turns it off. Text is
streamed as it is generated; --stats prints prefill and decode tokens/s on stderr. The command calls the
model's generate like any user, with engine=--engine: "fast" (default) steps through the device's fast form
(model.fast(): fast_cpu.FastCpuModel on the CPU; on the GPU the CUDA-graph decode engine for bfloat16, every
decoding mode, batch <= 8), "reference" through the concept modules themselves (NumPy or CuPy).

Every StableLmError (a missing or corrupt model, offline without a cache, invalid values) ends the
command with one line on stderr and exit code 2; a traceback means a bug. The surroundings are checked
in the command line's own words before a command runs (check_surroundings): option values (--temperature,
--top-p, ...), text arguments holding invalid UTF-8, --device gpu without CuPy; a closed or full
standard output is one line and exit 2 too (a closed pipe, as with head, exits 0 quietly).

Subcommands come from modules listed in COMMAND_MODULES, each with an `add_cli_commands(subparsers)`
that adds its parsers and sets `func` (called with the parsed arguments, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

import numpy as np

from ._version import __version__
from .errors import GenerationError, StableLmError, TokenizerError, printable

PROG = "stablelm-ref"
MAX_TURN_CHARS = 1_000_000  # one chat turn read from stdin (a model's whole context is a few thousand tokens)
COMMAND_MODULES = ["stablelm_ref.cli", "stablelm_ref.trace"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2), like every other user error, and an
    abbreviated option (--max-new-tok) is refused rather than guessed. Subcommand parsers are _Parsers too."""

    def __init__(self, *args, allow_abbrev=False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}{self._spelled_in_full(message)} (see {self.prog} --help)\n")

    def _spelled_in_full(self, message):
        """For an unrecognized --opt that begins a real option's name (an abbreviation, which is refused): a
        hint naming the option(s) it abbreviates, of this parser or of its subcommands."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        hints, options = [], _option_strings(self)
        for name in (arg.split("=", 1)[0] for arg in message.split(":", 1)[1].split() if arg.startswith("--")):
            full = sorted(o for o in options if o.startswith(name) and o != name)
            if full:
                hints.append(f"{name} is not an option (options are spelled in full): did you mean "
                             f"{' or '.join(full)}?")
        return "; " + "; ".join(hints) if hints else ""


def _option_strings(parser):
    """Every --option of a parser and of its subcommands' parsers."""
    out = set()
    for action in parser._actions:
        out.update(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _option_strings(sub)
    return out


# ---- shared options and loading -----------------------------------------------------------------

def add_model_arguments(p, model_help="model directory or Hugging Face Hub repo id (default: the embedded default "
                                      "model)"):
    p.add_argument("--model", metavar="DIR_OR_REPO", help=model_help)
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) when --model is a repo id")
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16"),
                   help="compute dtype (default: float32 on cpu, bfloat16 on gpu)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="cpu (NumPy) or gpu (CuPy)")
    p.add_argument("--engine", choices=("fast", "reference"), default="fast",
                   help="fast (default): the device's fast form, fused NumPy on the CPU, the CUDA-graph decode "
                        "engine on the GPU (bfloat16, batch <= 8); reference: the concept modules themselves")


def add_sampling_arguments(p):
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="tokens to generate (default: the model's generation_config.json, else 64)")
    p.add_argument("--temperature", type=float, metavar="T",
                   help="sampling temperature; > 0 samples, 0 is greedy (default: the model's "
                        "generation_config.json, else greedy)")
    p.add_argument("--top-k", type=int, metavar="K", help="sample from the K most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, metavar="P", help="sample from the smallest set reaching probability P")
    p.add_argument("--repetition-penalty", type=float, metavar="R", help="penalise tokens already present (> 1)")
    p.add_argument("--sample", action="store_true",
                   help="sample (with the model's generation_config.json settings, else transformers' "
                        "defaults: top-k 50)")
    p.add_argument("--seed", type=int, metavar="S", help="random seed for sampling (reproducible output)")
    p.add_argument("--stats", action="store_true", help="print prefill and decode tokens/s on stderr")


def resolve_model_dir(model, revision=None):
    """--model -> a local directory (hub.model_directory); without --model, the embedded default model.
    --revision with a local directory (or the default model) is an error: it would select nothing."""
    from . import hub

    model = hub.DEFAULT_MODEL if model is None else model
    local = hub.local_model(model)
    if revision is not None and local is not None:                              # hub only warns
        what = local if model == hub.DEFAULT_MODEL else f"--model {local}"
        raise StableLmError(f"--revision {revision} selects a commit of a Hub repository, but {what} is not one; "
                            "drop --revision, or give --model a Hub repo id")
    return hub.model_directory(model, revision=revision)


def load(args):
    """(model, tokenizer) from the parsed --model/--dtype/--device, checked to belong together."""
    from .heads import StableLmForCausalLM
    from .tokenizer import Tokenizer

    directory = resolve_model_dir(args.model, args.revision)
    model = StableLmForCausalLM.from_pretrained(directory, dtype=args.dtype, device=args.device)
    tok = Tokenizer.from_pretrained(directory)
    if tok.vocab_size > model.config.vocab_size:
        raise TokenizerError(f"{directory}: the tokenizer has {tok.vocab_size} ids but the model's vocabulary has "
                             f"{model.config.vocab_size}: they do not belong together")
    return model, tok


CLI_MAX_NEW_TOKENS = 64   # when neither --max-new-tokens nor the model's generation config sets a length


def generation_kwargs(args, tok, model):
    """generate's keywords for the options given; an option not given is not passed, so the model's generation
    config (generation_config.json) decides, as for generate's own keywords. Two fallbacks of the command's
    own: CLI_MAX_NEW_TOKENS new tokens when nothing sets a length, and the tokenizer's eos/pad ids when the
    generation config has none."""
    gc = model.generation_config
    t = args.temperature
    options = args.sample or t is not None or args.top_k is not None or args.top_p is not None
    sample = False if t == 0 else True if options else None          # None: the generation config's do_sample
    kwargs = dict(do_sample=sample, repetition_penalty=args.repetition_penalty, seed=args.seed, engine=args.engine)
    if args.max_new_tokens is not None:
        kwargs["max_new_tokens"] = args.max_new_tokens
    elif gc.max_new_tokens is None and gc.max_length is None:
        kwargs["max_new_tokens"] = CLI_MAX_NEW_TOKENS
    if sample:  # values checked by check_arguments, in the options' words, before the command ran
        kwargs.update(temperature=t, top_k=args.top_k, top_p=args.top_p)
    if tok.eos_token_id is not None and gc.eos_token_id is None:
        kwargs["eos_token_id"] = tok.eos_token_id
    if tok.pad_token_id is not None and gc.pad_token_id is None:
        kwargs["pad_token_id"] = tok.pad_token_id
    return kwargs


def print_stats(timings, file=None):
    file = file if file is not None else sys.stderr

    def rate(n, s):
        return f"{n / s:.1f} tokens/s" if s > 0 and n else "n/a"

    print(f"prefill: {timings['prefill_tokens']} tokens in {timings['prefill_s']:.3f} s "
          f"({rate(timings['prefill_tokens'], timings['prefill_s'])}); decode: {timings['decode_tokens']} tokens "
          f"in {timings['decode_s']:.3f} s ({rate(timings['decode_tokens'], timings['decode_s'])})", file=file)


# ---- generate -----------------------------------------------------------------------------------

def cmd_generate(args):
    from .generation import TextStreamer, generate

    model, tok = load(args)
    enc = tok(args.prompt)
    if enc["input_ids"].size == 0:
        raise GenerationError("empty prompt: the PROMPT gives no tokens; give some text to continue")
    timings = {}
    generate(model, enc["input_ids"], attention_mask=enc["attention_mask"], streamer=TextStreamer(tok, skip_prompt=False),
             timings=timings, **generation_kwargs(args, tok, model))
    if args.stats:
        print_stats(timings)
    return 0


# ---- chat ---------------------------------------------------------------------------------------

def cmd_chat(args):
    from .generation import TextStreamer, generate
    from .model import check_context
    from .tokenizer import check_text

    model, tok = load(args)
    if tok.chat_template is None:
        raise TokenizerError(f"{args.model or 'the default model'}: the tokenizer has no chat template "
                             "(tokenizer_config.json 'chat_template'); use a chat model such as "
                             "stabilityai/stablelm-zephyr-3b")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    kwargs = generation_kwargs(args, tok, model)
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline(MAX_TURN_CHARS + 1)        # bounded: stdin may be /dev/zero, or lack newlines
        if len(line) > MAX_TURN_CHARS:
            raise GenerationError(f"a chat turn on standard input is longer than {MAX_TURN_CHARS:,} characters (no "
                                  "newline); give one turn per line")
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": check_text(line.rstrip("\n"), "the chat input (stdin)")})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not ids:                             # the model's "input_ids is empty" would blame the user's turn
            raise TokenizerError(f"{tok.source}: the chat template rendered no tokens for this conversation; check "
                                 "tokenizer_config.json's 'chat_template'")
        check_context(model.config, len(ids), "the conversation has grown to",   # generate's, in the chat's words
                      "start a new chat (a shorter --system or shorter turns last longer)")
        streamer = TextStreamer(tok, skip_prompt=True)
        timings = {}
        out = generate(model, [ids], streamer=streamer, timings=timings, **kwargs)
        reply = tok.decode(out[0, len(ids):], skip_special_tokens=True)   # decode takes device arrays too
        messages.append({"role": "assistant", "content": reply.strip()})
        if args.stats:
            print_stats(timings)


# ---- the parser ---------------------------------------------------------------------------------

def add_cli_commands(subparsers):
    g = subparsers.add_parser("generate", help="continue a prompt (streams the text)",
                              description="Continue PROMPT with a StableLM model, streaming the text.")
    add_model_arguments(g)
    add_sampling_arguments(g)
    g.add_argument("prompt", metavar="PROMPT", help="the text to continue")
    g.set_defaults(func=cmd_generate)

    c = subparsers.add_parser("chat", help="a conversation using the tokenizer's chat template",
                              description="Chat with a StableLM chat model: one user turn per line on stdin "
                                          "(/exit or end of input to stop).")
    add_model_arguments(c, model_help="a chat model's directory or Hub repo id, e.g. stabilityai/stablelm-zephyr-3b "
                                      "(the embedded default model has no chat template)")
    add_sampling_arguments(c)
    c.add_argument("--system", metavar="TEXT", help="a system message opening the conversation")
    c.set_defaults(func=cmd_chat)


def build_parser():
    parser = _Parser(prog=PROG, description="A readable NumPy reference implementation of StableLM: generate "
                                            "text from the command line.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli_commands(subparsers)
    return parser


class OutputError(StableLmError):
    """Standard output cannot be written (closed, disk full, an I/O error)."""


class _GuardedOutput:
    """sys.stdout while a command runs: a failed write or flush becomes an OutputError (one line, exit 2)
    instead of a traceback; a closed pipe stays a BrokenPipeError (quiet exit 0, like head & co.)."""

    def __init__(self, stream):
        self._stream = stream

    def _guard(self, method, *a):
        try:
            return getattr(self._stream, method)(*a)
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise OutputError(f"cannot write to standard output ({reason})") from None

    def write(self, s):
        return self._guard("write", s)

    def flush(self):
        return self._guard("flush")

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _silence_stdout():
    """Point file descriptor 1 at /dev/null so that the interpreter's last flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def check_arguments(args):
    """The sampling and length options (generate, chat), checked by generation.check_values, generate's own
    rules, in the command line's words; --temperature 0 is greedy decoding (generate is given no temperature)."""
    from .generation import check_values

    options = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
    values = {key: getattr(args, key, None) for key in options}
    if values["temperature"] == 0:
        values["temperature"] = None
    check_values(values, names={key: "--" + key.replace("_", "-") for key in options}, greedy="0 is greedy decoding")


def check_surroundings(args):
    """What the command line brings before a command runs: the options' values, text arguments that
    hold lone surrogates (invalid UTF-8 in argv), the GPU when --device gpu asks for it; chat's
    standard input is read with surrogateescape so that invalid UTF-8 reaches the text check."""
    from .tokenizer import check_text

    if hasattr(args, "max_new_tokens"):
        check_arguments(args)
    for attr, what in (("prompt", "PROMPT"), ("system", "--system"), ("text", "--text")):
        if isinstance(getattr(args, attr, None), str):
            check_text(getattr(args, attr), what)
    if getattr(args, "device", None) == "gpu":
        from .model import array_module

        try:
            array_module("gpu")                 # CuPy and a GPU, before anything is loaded
        except StableLmError as e:
            raise StableLmError(str(e).replace("device='gpu'", "--device gpu").replace("device='cpu'",
                                                                                        "--device cpu")) from None
    if getattr(args, "command", None) == "chat" and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if sys.stdout is None:  # started with descriptor 1 closed
        print(f"{PROG}: error: standard output is closed; nothing can be written", file=sys.stderr)
        return 2
    real_stdout, sys.stdout = sys.stdout, _GuardedOutput(sys.stdout)
    with warnings.catch_warnings():                  # restored when the command ends
        warnings.showwarning = _one_line_warning
        try:
            check_surroundings(args)
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # non-finite logits: reported once,
                return args.func(args) or 0                                     # by generate, as one line
        except StableLmError as e:
            try:
                sys.stdout.flush()
            except (StableLmError, OSError):
                _silence_stdout()
            print(f"{PROG}: error: " + _one_line(e), file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        except BrokenPipeError:  # output piped into head & co.
            _silence_stdout()
            return 0
        finally:
            sys.stdout = real_stdout


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """A warning while a command runs (prompt + new tokens past the context, ...): one line on stderr in the
    command's words, not Python's two lines with a source file and a line of code."""
    print(f"{PROG}: warning: " + _one_line(message), file=sys.stderr)


def _one_line(text):
    """A message on one line (its line breaks and runs of spaces as single spaces), safe for a terminal."""
    return printable(" ".join(str(text).split()))


if __name__ == "__main__":
    sys.exit(main())
