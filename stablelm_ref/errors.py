"""One small hierarchy of errors, each for people: what is wrong, where, and what to do.

    StableLmError
      ConfigError       config.json or a StableLmConfig value is invalid
      CheckpointError   a checkpoint file is missing, corrupt, refused (pickle) or does not fit the config
      TokenizerError    tokenizer files are missing or invalid, a chat template is refused
      GenerationError   invalid input ids, masks or sampling arguments
      HubError          a model could not be fetched from (or found in the cache of) the Hugging Face Hub

The command line turns any StableLmError into one line on stderr and exit code 2; any other
exception escaping is a bug. Messages can carry text from files (a chat template's raise_exception, a
trace's tensor names): `printable` shows its control characters as escapes before it reaches a terminal.
`check_flag` is the one rule of every True/False argument or file key the package takes (do_sample, use_cache,
the tokenizer's flags, ...), with one message form; `is_int` / `check_int` the one rule of every integer (config.json's
sizes and token ids, generate's lengths and seed, a KV cache's sizes, from_config's seed), `is_number` of every other
number generate and from_config take.
"""

import math
import numbers

import numpy as np


class StableLmError(Exception):
    """Base class of every error caused by input (files, configs, ids, arguments)."""


class ConfigError(StableLmError, ValueError):
    """A configuration key holds an invalid value."""


class CheckpointError(StableLmError):
    """A checkpoint is missing, corrupt, refused, or does not match its configuration."""


class TokenizerError(StableLmError):
    """Tokenizer files are missing or invalid, or a chat template cannot be rendered."""


class GenerationError(StableLmError, ValueError):
    """Invalid input ids, attention mask or generation argument."""


class HubError(StableLmError):
    """A model could not be downloaded from the Hub or found in its local cache."""


def printable(text):
    """Text from a file, safe to print on a terminal: control and format characters (escape sequences that
    recolour, retitle or clear the terminal, a newline that forges a row) are shown as escapes (ESC as \\x1b)."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def is_flag(value):
    """True or False: a bool, or NumPy's bool (what a comparison such as `x.any()` gives). Anything else is not
    a flag: 1 and 0, None, and the string "false" (which Python's truth test would take as true, silently)."""
    return isinstance(value, (bool, np.bool_))


def check_flag(value, name, error, advice="", json=False):
    """bool(value) when is_flag(value), else `error` "{name} must be True or False, got {value!r}{advice}";
    `name` says where the value came from when it was a file ("tokenizer_config.json key 'add_bos_token'"),
    and json=True (a value read from a JSON file) adds the file's spelling, " (in JSON: true or false)"."""
    if not is_flag(value):
        raise error(f"{name} must be True or False, got {value!r}{' (in JSON: true or false)' if json else ''}"
                    f"{advice}")
    return bool(value)


def is_int(value):
    """An integer: Python's int or a NumPy integer (np.int64(3), what indexing an array gives). Not a bool
    (True is an int to Python; np.True_ is not an integer to NumPy), not 2.0, not "3"."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(value, name, error, minimum, also=""):
    """int(value) when is_int(value) and value >= minimum, else `error` "{name} must be an integer >= {minimum}{also},
    got {value!r}" (`also`: what else the caller takes, " or None")."""
    if not is_int(value) or value < minimum:
        raise error(f"{name} must be an integer >= {minimum}{also}, got {value!r}")
    return int(value)


def is_number(value):
    """A finite real number: an int, a float or a NumPy number, not a bool (is_int's rule), not NaN or inf, and
    not an int too large for a float (10**400: float() raises OverflowError, which escaped as a traceback)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False
