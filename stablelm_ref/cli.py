"""The stablelm-ref command: generate text from a prompt, or chat, with a local or Hub model.

    stablelm-ref generate [--model DIR_OR_REPO] [--max-new-tokens N] [--temperature T] [--top-k K]
                          [--top-p P] [--seed S] [--dtype float32|float64|bfloat16] [--device cpu|gpu]
                          [--stats] PROMPT
    stablelm-ref chat [--model DIR_OR_REPO] [--system TEXT] ...        (reads user turns from stdin)
    stablelm-ref trace / compare ...                                     (trace.py: golden-reference checks)

Without --model the embedded default model (stablelm_ref/default_model/, named "stablelm-ref:default")
is used. Decoding is greedy unless a temperature > 0, --top-k or --top-p is given (or --sample). Text is
streamed as it is generated; --stats prints prefill and decode tokens/s on stderr. The command calls the
model's generate like any user, with engine=--engine: "fast" (default) steps through the device's fast form
(model.fast(): fast_cpu.FastCpuModel on the CPU; on the GPU the CUDA-graph decode engine for bfloat16, every
decoding mode, batch <= 8), "reference" through the concept modules themselves (NumPy or CuPy).

Every StableLmError (a missing or corrupt model, offline without a cache, invalid values) ends the
command with one line on stderr and exit code 2; a traceback means a bug.

Subcommands come from modules listed in COMMAND_MODULES, each with an `add_cli_commands(subparsers)`
that adds its parsers and sets `func` (called with the parsed arguments, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import numpy as np

from ._version import __version__
from .errors import StableLmError, TokenizerError

PROG = "stablelm-ref"
COMMAND_MODULES = ["stablelm_ref.cli", "stablelm_ref.trace"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2), like every other user error, and an
    abbreviated option (--max-new-tok) is refused rather than guessed. Subcommand parsers are _Parsers too."""

    def __init__(self, *args, allow_abbrev=False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---- shared options and loading -----------------------------------------------------------------

def add_model_arguments(p):
    p.add_argument("--model", metavar="DIR_OR_REPO",
                   help="model directory or Hugging Face Hub repo id (default: the embedded default model)")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit) when --model is a repo id")
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16"),
                   help="compute dtype (default: float32 on cpu, bfloat16 on gpu)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="cpu (NumPy) or gpu (CuPy)")
    p.add_argument("--engine", choices=("fast", "reference"), default="fast",
                   help="fast (default): the device's fast form, fused NumPy on the CPU, the CUDA-graph decode "
                        "engine on the GPU (bfloat16, batch <= 8); reference: the concept modules themselves")


def add_sampling_arguments(p):
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, metavar="T",
                   help="sampling temperature; > 0 samples, 0 is greedy (default: greedy)")
    p.add_argument("--top-k", type=int, metavar="K", help="sample from the K most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, metavar="P", help="sample from the smallest set reaching probability P")
    p.add_argument("--repetition-penalty", type=float, metavar="R", help="penalise tokens already present (> 1)")
    p.add_argument("--sample", action="store_true", help="sample (transformers' defaults: top-k 50)")
    p.add_argument("--seed", type=int, metavar="S", help="random seed for sampling (reproducible output)")
    p.add_argument("--stats", action="store_true", help="print prefill and decode tokens/s on stderr")


def resolve_model_dir(model, revision=None):
    """--model -> a local directory (hub.model_directory); without --model, the embedded default model."""
    from . import hub

    return hub.model_directory(model or hub.DEFAULT_MODEL, revision=revision)


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


def generation_kwargs(args, tok, model):
    t = args.temperature
    sample = False if t == 0 else (args.sample or t is not None or args.top_k is not None or args.top_p is not None)
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=sample, repetition_penalty=args.repetition_penalty,
                  seed=args.seed, engine=args.engine)
    if sample:  # a negative temperature or an invalid top-k / top-p is rejected by generate, with its message
        kwargs.update(temperature=t, top_k=args.top_k, top_p=args.top_p)
    if tok.eos_token_id is not None:
        kwargs["eos_token_id"] = tok.eos_token_id
    if tok.pad_token_id is not None:
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
    timings = {}
    generate(model, enc["input_ids"], attention_mask=enc["attention_mask"], streamer=TextStreamer(tok, skip_prompt=False),
             timings=timings, **generation_kwargs(args, tok, model))
    if args.stats:
        print_stats(timings)
    return 0


# ---- chat ---------------------------------------------------------------------------------------

def cmd_chat(args):
    from .generation import TextStreamer, generate

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
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        streamer = TextStreamer(tok, skip_prompt=True)
        timings = {}
        out = generate(model, [ids], streamer=streamer, timings=timings, **kwargs)
        reply = tok.decode(np.asarray(out.get() if hasattr(out, "get") else out)[0, len(ids):],
                           skip_special_tokens=True)
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
    add_model_arguments(c)
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


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except StableLmError as e:
        sys.stdout.flush()
        print(f"{PROG}: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
