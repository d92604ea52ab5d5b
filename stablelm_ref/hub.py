"""Where a model's files are: the embedded default model, a local directory, or the Hugging Face Hub.

    model_directory("stablelm-ref:default")          -> .../stablelm_ref/default_model  (DEFAULT_MODEL)
    model_directory("path/to/model")                 -> path/to/model
    model_directory("stabilityai/stablelm-3b-4e1t")  -> snapshot(...), below
    snapshot("stabilityai/stablelm-3b-4e1t") -> ~/.cache/huggingface/hub/models--stabilityai--stablelm-3b-4e1t/snapshots/<commit>/

`model_directory` is what every from_pretrained (models, Tokenizer, StableLmConfig) and the CLI's
--model go through. The name of the embedded default model has a colon, which no Hub repo id can hold,
so it never shadows a repository; a local directory of any name is taken as it is (`local_model` says which
paths are local: a `revision` given with one selects nothing, and a UserWarning says so, where transformers is
silent; the CLI's --revision is an error there).

`huggingface_hub.snapshot_download` does the work (its cache layout, its progress bars, resumable
downloads, HF_HOME / HF_HUB_CACHE, tokens from `hf auth login`); this file decides what to fetch and
what to say when it cannot. Only `*.safetensors` and `*.json` are fetched (config, generation config,
tokenizer, shard index): pickle checkpoints (`pytorch_model.bin`) are never downloaded, let alone opened.

Offline (HF_HUB_OFFLINE=1, local_files_only=True, or no network): the cached snapshot is used; if
there is none, HubError says the model is not cached and how to get it there.
"""

from __future__ import annotations

import os
import warnings

from .errors import CheckpointError, HubError, StableLmError, is_flag

ALLOW_PATTERNS = ["*.safetensors", "*.json"]
DEFAULT_MODEL = "stablelm-ref:default"
DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")


def model_directory(path, error=CheckpointError, holds="config.json", **hub_kwargs):
    """The local directory of a model: DEFAULT_MODEL -> the embedded default model, a directory -> itself,
    anything else -> a Hub repo id for snapshot(path, **hub_kwargs). `error` is raised, naming `holds`
    (the file the caller reads), when `path` is a file rather than a directory."""
    if not isinstance(path, (str, os.PathLike)):
        raise error(f"give a model directory or a Hub repo id (a string or a path), got {path!r}")
    check_hub_arguments(hub_kwargs, error)
    path = os.fspath(path)
    local = local_model(path)
    if local is not None:
        if path == DEFAULT_MODEL and not os.path.isfile(os.path.join(DEFAULT_MODEL_DIR, "config.json")):
            raise StableLmError(f"the embedded default model is missing ({DEFAULT_MODEL_DIR} has no config.json): "
                                "restore it (in a checkout: git checkout -- stablelm_ref/default_model; installed as "
                                "a package: pip install --force-reinstall stablelm-ref), or give a model directory or "
                                "Hub repo id (--model DIR_OR_REPO on the command line)")
        _revision_ignored(hub_kwargs.get("revision"), local)
        return DEFAULT_MODEL_DIR if path == DEFAULT_MODEL else path
    if os.path.exists(path):
        raise error(f"{path}: a file, not a model directory; give the directory that holds {holds}")
    return snapshot(path, **hub_kwargs)


def local_model(path):
    """What `path` (a str or os.PathLike) names when model_directory takes it as a local model, not a Hub repo id:
    "the embedded default model" (DEFAULT_MODEL) or "{path} (a local directory)"; None otherwise. A revision
    selects nothing there: model_directory warns, the CLI refuses --revision with one."""
    path = os.fspath(path)
    if path == DEFAULT_MODEL:
        return "the embedded default model"
    return f"{path} (a local directory)" if os.path.isdir(path) else None


def _revision_ignored(revision, what):
    """A revision names a commit of a Hub repository; a local model has none. transformers ignores it silently,
    which hides a mistake (the files loaded are whatever the directory holds): warn, naming both."""
    if revision is not None:
        warnings.warn(f"revision={revision!r} is ignored: {what} is not a Hub repository; the files loaded are the "
                      "ones it holds now (give a Hub repo id to select a revision)", UserWarning, stacklevel=4)


# The Hub arguments from_pretrained passes on (to snapshot): name -> (acceptable, what it must be).
HUB_ARGUMENTS = {
    "revision": (lambda v: v is None or (isinstance(v, str) and v != ""), "a branch, tag or commit name"),
    "cache_dir": (lambda v: v is None or (isinstance(v, (str, os.PathLike)) and os.fspath(v) != ""), "a directory"),
    "local_files_only": (is_flag, "True or False"),
    "token": (lambda v: v is None or isinstance(v, str) or is_flag(v), "a Hub token string, True or False"),
}
# transformers' from_pretrained arguments a porter may pass, and what this project takes instead
NOT_TAKEN = {"torch_dtype": "dtype='float32' | 'float64' | 'bfloat16'", "device_map": "device='cpu' | 'gpu'",
             "trust_remote_code": "nothing: no code from a checkpoint is ever run"}


def check_hub_arguments(kwargs, error=CheckpointError):
    """`error` for an argument from_pretrained does not take (a misspelt or transformers-only one was silently
    ignored for a local directory and a TypeError for a repo id) or a Hub argument of the wrong type."""
    for name, value in kwargs.items():
        if name not in HUB_ARGUMENTS:
            instead = f"; this project takes {NOT_TAKEN[name]}" if name in NOT_TAKEN else ""
            raise error(f"from_pretrained got an unknown argument {name!r}{instead} (its Hub arguments are "
                        f"{', '.join(HUB_ARGUMENTS)})")
        ok, what = HUB_ARGUMENTS[name]
        if not ok(value):
            raise error(f"{name} must be {what}, got {value!r}")


def snapshot_download(repo_id, **kwargs):
    """huggingface_hub.snapshot_download, imported on first use (tests replace this function)."""
    from huggingface_hub import snapshot_download as download

    return download(repo_id, **kwargs)


def is_offline():
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set to a true value, now or when huggingface_hub was imported."""
    truthy = {"1", "on", "yes", "true"}
    if any(os.environ.get(v, "").strip().lower() in truthy for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:
        return False


def _errors():
    try:
        from huggingface_hub import errors
    except ImportError:  # huggingface_hub < 0.24
        from huggingface_hub import utils as errors
    return errors


def not_cached_message(repo_id, revision=None):
    rev = f" (revision {revision})" if revision else ""
    return (f"{repo_id}{rev} is not in the local Hugging Face cache and cannot be downloaded here (offline or no "
            f"network). On a machine with network run: huggingface-cli download {repo_id} --include "
            f"'*.safetensors' '*.json'{' --revision ' + revision if revision else ''} (or hf download ...; then copy "
            "the cache, HF_HOME, here), or pass a local model directory")


def snapshot(repo_id, revision=None, cache_dir=None, local_files_only=False, token=None):
    """The local directory of `repo_id` at `revision`, downloading *.safetensors and *.json if needed."""
    if not isinstance(repo_id, str) or not repo_id:
        raise HubError(f"a model is a local directory or a Hub repo id like 'stabilityai/stablelm-3b-4e1t', "
                       f"got {repo_id!r}")
    errors = _errors()
    kwargs = dict(revision=revision, cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
                  allow_patterns=ALLOW_PATTERNS)
    if token is not None:
        kwargs["token"] = bool(token) if is_flag(token) else token    # np.True_ -> True for huggingface_hub
    not_found = "no such local directory, and"
    if not (local_files_only or is_offline()):
        try:
            return snapshot_download(repo_id, **kwargs)
        except errors.HFValidationError:
            raise HubError(f"{repo_id!r}: {not_found} not a valid Hub repo id ('owner/name')") from None
        except errors.GatedRepoError:
            raise HubError(f"{repo_id}: a gated repository; accept its terms on huggingface.co and log in "
                           "(hf auth login), or pass a local directory") from None
        except errors.RepositoryNotFoundError:
            raise HubError(f"{repo_id!r}: {not_found} no such repository on the Hub (or it is private: log in "
                           "with hf auth login)") from None
        except errors.RevisionNotFoundError:
            raise HubError(f"{repo_id}: revision {revision!r} does not exist on the Hub") from None
        except Exception as e:  # no network: connection errors, timeouts, offline mode
            if not _is_connection_error(e, errors):
                raise HubError(f"{repo_id}: download failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                               ) from None
    try:
        return snapshot_download(repo_id, local_files_only=True, **kwargs)
    except errors.HFValidationError:
        raise HubError(f"{repo_id!r}: {not_found} not a valid Hub repo id ('owner/name')") from None
    except Exception as e:
        if isinstance(e, (FileNotFoundError, OSError, ValueError, LookupError)) or _is_connection_error(e, errors):
            raise HubError(not_cached_message(repo_id, revision)) from None
        raise


def _is_connection_error(e, errors):
    kinds = [ConnectionError, TimeoutError, errors.LocalEntryNotFoundError]
    for module, name in (("httpx", "TransportError"), ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            kinds.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    offline = getattr(errors, "OfflineModeIsEnabled", None)
    if offline is not None:
        kinds.append(offline)
    return isinstance(e, tuple(kinds))


def cached_snapshot(repo_id, filenames=("config.json",), revision=None, cache_dir=None):
    """The cached snapshot directory holding all `filenames`, or None (never touches the network)."""
    from huggingface_hub import try_to_load_from_cache

    found = []
    for name in filenames:
        path = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision)
        if not isinstance(path, str):
            return None
        found.append(os.path.dirname(path))
    return found[0] if found and all(d == found[0] for d in found) else None
