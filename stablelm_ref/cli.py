"""The stablelm-ref command: generate text from a prompt, or chat, with a local or Hub model; trace and compare.

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
command with one line on stderr and exit code 2; a traceback means a bug. command.py runs the commands
(the same runner serves `python -m stablelm_ref.trace`): the surroundings are checked in the command line's
own words before a command runs (check_surroundings: option values such as --temperature and --top-p, text
arguments holding invalid UTF-8, --device gpu without CuPy); a warning is one line; a closed or full
standard output is one line and exit 2 too (a closed pipe, as with head, exits 0 quietly).

Subcommands come from modules listed in COMMAND_MODULES, each with an `add_cli_commands(subparsers)`
that adds its parsers and sets `func` (called with the parsed arguments, returns an exit code).
"""

from __future__ import annotations

import importlib
import sys

from ._version import __version__
from .command import PROG, _Parser, run
from .errors import GenerationError, StableLmError, TokenizerError

MAX_TURN_CHARS = 1_000_000  # one chat turn read from stdin (a model's whole context is a few thousand tokens)
COMMAND_MODULES = ["stablelm_ref.cli", "stablelm_ref.trace"]


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
                   help="sampling temperature: > 0 turns sampling on (add --seed to reproduce), 0 is greedy "
                        "(default: the model's generation_config.json, else greedy)")
    p.add_argument("--top-k", type=int, metavar="K",
                   help="sample from the K most likely tokens (0: no top-k limit); turns sampling on (add --seed to "
                        "reproduce)")
    p.add_argument("--top-p", type=float, metavar="P",
                   help="sample from the smallest set reaching probability P; turns sampling on (add --seed to "
                        "reproduce)")
    p.add_argument("--repetition-penalty", type=float, metavar="R", help="penalise tokens already present (> 1)")
    p.add_argument("--sample", action="store_true",
                   help="sample (with the model's generation_config.json settings, else transformers' "
                        "defaults: top-k 50); add --seed to reproduce")
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
    tok.check_vocabulary(model.config.vocab_size, directory)
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
    parser = _Parser(prog=PROG, description="A readable NumPy reference implementation of StableLM: continue a "
                                            "prompt (generate), chat with a chat model (chat), record every "
                                            "intermediate of a forward pass (trace) and find where two traces "
                                            "first disagree (compare).",
                     epilog=f"{PROG} COMMAND --help for each command's options.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli_commands(subparsers)
    return parser


def main(argv=None):
    """`stablelm-ref COMMAND ...`: the exit code (command.run: one-line errors and warnings, exit 2)."""
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
