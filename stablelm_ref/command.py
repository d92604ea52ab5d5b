"""The command line's runner, shared by `stablelm-ref` (cli.py) and `python -m stablelm_ref.trace` (trace.py), so
both speak alike: every StableLmError ends the command with one line on stderr ("stablelm-ref: error: ...") and exit
code 2, a warning is one line ("stablelm-ref: warning: ..."), a usage error is one line, an abbreviated option is
refused with a hint naming the full spellings of the typed command's options (whatever usage error argparse reports
first: a missing argument comes before the unrecognized ones), a closed or full standard output is
one line and exit 2 (a closed pipe, as with head, exits 0 quietly), Ctrl-C exits 130. The surroundings are checked
in the command line's own words before a command runs (check_surroundings): option values (--temperature,
--top-p, ...), text arguments holding invalid UTF-8, --device gpu without CuPy.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np

from .errors import StableLmError, printable

PROG = "stablelm-ref"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2), like every other user error, and an
    abbreviated option (--max-new-tok) is refused rather than guessed. Subcommand parsers are _Parsers too."""

    def __init__(self, *args, allow_abbrev=False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    _argv = ()                     # the arguments being parsed, for the hint of any usage error

    def parse_args(self, args=None, namespace=None):
        """argparse's parse_args, remembering the arguments and the typed subcommand, so that an abbreviation's
        hint names only its options (argparse reports unrecognized arguments from the top parser, which does
        not say) and comes with any usage error (a subcommand's parser reports a missing one itself)."""
        args = list(sys.argv[1:] if args is None else args)      # read once: argv may be any iterable
        _Parser._argv, self._typed = tuple(args), None
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self._typed = next((getattr(parsed, a.dest, None) for a in self._actions
                                if isinstance(a, argparse._SubParsersAction)), None)
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}{self._spelled_in_full()} (see {self.prog} --help)\n")

    def _spelled_in_full(self):
        """For each --opt typed that is no option but begins a real option's name (an abbreviation, which is
        refused): a hint naming the option(s) it abbreviates, of this parser and of the subcommand typed (all its
        subcommands' when none was). Given with any usage error: argparse may report another one first, e.g.
        trace --id 1 as "one of the arguments --ids --text is required"."""
        hints, options = [], _option_strings(self, getattr(self, "_typed", None))
        typed = self._argv[:self._argv.index("--")] if "--" in self._argv else self._argv
        for name in dict.fromkeys(arg.split("=", 1)[0] for arg in typed if arg.startswith("--")):
            full = sorted(o for o in options if o.startswith(name) and o != name) if name not in options else []
            if full:
                hints.append(f"{name} is not an option (options are spelled in full): did you mean "
                             f"{' or '.join(full)}?")
        return "; " + "; ".join(hints) if hints else ""


def _option_strings(parser, typed=None):
    """Every --option of a parser and of its subcommands' parsers (only the `typed` one's, when given)."""
    out = set()
    for action in parser._actions:
        out.update(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if typed is None or name == typed:
                    out |= _option_strings(sub)
    return out


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


def run(parser, argv=None):
    """Parse argv with `parser` (a _Parser) and run the chosen command's `func`: its exit code; a StableLmError is
    one line on stderr and exit 2, a warning one line, a closed pipe a quiet 0, Ctrl-C 130 (see the module).
    argv: the command line's words, an iterable of str (None: sys.argv[1:]); a str or bytes, or a word that is
    not a str, is a TypeError (argparse split a string into letters, and failed inside on bytes)."""
    if argv is not None:
        example = "e.g. main(['generate', '--max-new-tokens', '8', 'Hello'])"
        if isinstance(argv, (str, bytes)):
            raise TypeError(f"argv is the command line's words, a list of str ({example}); got one "
                            f"{type(argv).__name__}: {argv!r:.60}")
        argv = list(argv)
        for i, word in enumerate(argv):
            if not isinstance(word, str):
                raise TypeError(f"argv is the command line's words, a list of str ({example}); word {i} is "
                                f"{type(word).__name__}: {word!r:.60}")
    args = parser.parse_args(argv)
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
