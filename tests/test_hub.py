"""hub.snapshot: what is fetched, what passes through, offline behaviour. Never the network: a fake
downloader replaces huggingface_hub.snapshot_download, or the real one reads a local directory laid
out like the Hub cache with local_files_only=True."""

import os

import numpy as np
import pytest

from stablelm_ref import StableLmConfig, StableLmForCausalLM, hub
from stablelm_ref.errors import CheckpointError, HubError
from stablelm_ref.tokenizer import Tokenizer

from conftest import tiny_model
from test_tokenizer import tiny_tokenizer_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def online_without_network(monkeypatch):
    """Tests start 'online' (so the download path is taken) but any real download would fail loudly."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_network(repo_id, **kwargs):
        raise AssertionError("a test reached the real downloader")

    monkeypatch.setattr(hub, "snapshot_download", no_network)


def fake(calls, online=None, cached=None):
    """A snapshot_download stand-in: `online` is a path or an exception; `cached` likewise for local_files_only."""
    def download(repo_id, **kwargs):
        calls.append(kwargs)
        result = cached if kwargs.get("local_files_only") else online
        if isinstance(result, BaseException):
            raise result
        return result
    return download


def _err(cls, msg="x"):
    e = cls.__new__(cls)  # huggingface_hub's HTTP errors want a response object; the type is what matters
    Exception.__init__(e, msg)
    return e


def test_downloads_only_safetensors_and_json_and_passes_revision_and_cache_dir(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(hub, "snapshot_download", fake(calls, online="/cache/snap"))
    assert hub.snapshot("acme/tiny", revision="v1", cache_dir=tmp_path) == "/cache/snap"
    assert calls == [dict(revision="v1", cache_dir=str(tmp_path), allow_patterns=["*.safetensors", "*.json"])]


def test_hf_hub_offline_uses_only_the_cache(monkeypatch):
    calls = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "snapshot_download", fake(calls, online=AssertionError("online"), cached="/c"))
    assert hub.snapshot("acme/tiny") == "/c"
    assert [c.get("local_files_only") for c in calls] == [True]


def test_connection_error_falls_back_to_the_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(hub, "snapshot_download", fake(calls, online=ConnectionError("no route"), cached="/c"))
    assert hub.snapshot("acme/tiny") == "/c"
    assert [c.get("local_files_only") for c in calls] == [None, True]


def test_offline_and_not_cached_says_how_to_get_it(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(hub, "snapshot_download", fake([], online=ConnectionError("down"),
                                                       cached=LocalEntryNotFoundError("not cached")))
    with pytest.raises(HubError) as e:
        hub.snapshot("acme/tiny", revision="v2")
    msg = str(e.value)
    assert "acme/tiny (revision v2) is not in the local Hugging Face cache" in msg
    assert "huggingface-cli download acme/tiny --include '*.safetensors' '*.json' --revision v2" in msg
    assert "local model directory" in msg


@pytest.mark.parametrize("error, match", [
    ("RepositoryNotFoundError", "no such repository on the Hub"),
    ("GatedRepoError", "gated repository"),
    ("RevisionNotFoundError", "revision 'v9' does not exist"),
])
def test_hub_errors_become_hub_errors(monkeypatch, error, match):
    from huggingface_hub import errors

    monkeypatch.setattr(hub, "snapshot_download", fake([], online=_err(getattr(errors, error))))
    with pytest.raises(HubError, match=match):
        hub.snapshot("acme/tiny", revision="v9")


def test_invalid_repo_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "snapshot_download", _real)
    with pytest.raises(HubError, match="no such local directory, and not a valid Hub repo id"):
        hub.snapshot("/no/such/dir/model")


def _real(repo_id, **kwargs):
    assert kwargs.get("local_files_only"), "tests never download"
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, **kwargs)


def _hub_cache(root, repo_id, files_from):
    """Lay out `files_from`'s files as huggingface_hub's cache does: blobs, snapshots/<commit>, refs/main."""
    repo_dir = os.path.join(root, "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(repo_dir, "snapshots", COMMIT)
    os.makedirs(snap)
    os.makedirs(os.path.join(repo_dir, "refs"))
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(COMMIT)
    os.makedirs(os.path.join(repo_dir, "blobs"))
    for name in os.listdir(files_from):
        blob = os.path.join(repo_dir, "blobs", name + ".blob")
        os.replace(os.path.join(files_from, name), blob)
        os.symlink(os.path.relpath(blob, snap), os.path.join(snap, name))
    return snap


def test_model_and_tokenizer_load_from_a_hub_cache_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "snapshot_download", _real)
    model = tiny_model(seed=2, dtype="float32", vocab_size=300)
    src = str(tmp_path / "src")
    model.save_pretrained(src)
    tiny_tokenizer_dir(src)
    cache = str(tmp_path / "cache")
    snap = _hub_cache(cache, "acme/tiny", src)

    assert hub.snapshot("acme/tiny", cache_dir=cache) == snap
    assert hub.cached_snapshot("acme/tiny", ("config.json", "model.safetensors"), cache_dir=cache) == snap
    assert hub.cached_snapshot("acme/other", cache_dir=cache) is None
    loaded = StableLmForCausalLM.from_pretrained("acme/tiny", cache_dir=cache)
    assert StableLmConfig.from_pretrained("acme/tiny", cache_dir=cache).to_dict() == {**model.config.to_dict(),
                                                                                      "dtype": "float32"}
    for name, value in model.params.items():
        np.testing.assert_array_equal(loaded.params[name], value)
    tok = Tokenizer.from_pretrained("acme/tiny", cache_dir=cache)
    assert tok.eos_token_id == 0 and tok.decode(tok.encode("The weather")) == "The weather"
    with pytest.raises(HubError, match="acme/missing is not in the local Hugging Face cache"):
        StableLmForCausalLM.from_pretrained("acme/missing", cache_dir=cache)


def test_the_default_model_name_loads_from_any_directory(monkeypatch, tmp_path):
    """"stablelm-ref:default" is the model shipped in the package, whatever the working directory (the name
    is checked before any path, so a directory of that name is not read); the name never reaches the Hub."""
    from stablelm_ref import DEFAULT_MODEL

    def no_hub(repo_id, **kwargs):
        raise AssertionError(f"{repo_id!r} went to the Hub")

    monkeypatch.setattr(hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    assert hub.model_directory(DEFAULT_MODEL) == hub.DEFAULT_MODEL_DIR
    assert os.path.samefile(hub.DEFAULT_MODEL_DIR, os.path.join(os.path.dirname(hub.__file__), "default_model"))
    model = StableLmForCausalLM.from_pretrained(DEFAULT_MODEL)
    tok = Tokenizer.from_pretrained(DEFAULT_MODEL)
    assert StableLmConfig.from_pretrained(DEFAULT_MODEL) == model.config
    assert model.config.vocab_size >= tok.vocab_size > 256                # the 4096-token BPE, not a stub
    by_path = StableLmForCausalLM.from_pretrained(hub.DEFAULT_MODEL_DIR)
    assert model.params.keys() == by_path.params.keys()
    for name, value in model.params.items():
        np.testing.assert_array_equal(value, by_path.params[name])


def test_a_file_is_not_a_model_directory(tmp_path):
    from stablelm_ref.errors import CheckpointError, TokenizerError

    f = tmp_path / "config.json"
    f.write_text("{}")
    with pytest.raises(CheckpointError, match="a file, not a model directory; give the directory that holds config"):
        StableLmForCausalLM.from_pretrained(f)
    with pytest.raises(TokenizerError, match="a file, not a model directory; give the directory that holds tokenizer"):
        Tokenizer.from_pretrained(f)


def test_a_revision_with_a_local_directory_is_ignored_with_a_warning(tmp_path):
    """from_pretrained(local_dir, revision=...) loads the directory as it is (transformers does the same,
    silently); the revision asked for selects nothing, which a warning now says, naming it and the directory."""
    import warnings

    tiny_model(seed=2).save_pretrained(tmp_path)
    for load in (StableLmForCausalLM.from_pretrained, StableLmConfig.from_pretrained):
        with pytest.warns(UserWarning, match=rf"^revision='v2' is ignored: {tmp_path} \(a local directory\) is "
                                             "not a Hub repository"):
            load(str(tmp_path), revision="v2")
        with warnings.catch_warnings():
            warnings.simplefilter("error")                          # no revision: no warning
            load(str(tmp_path))
    with pytest.warns(UserWarning, match=r"^revision='main' is ignored: the embedded default model is not a Hub"):
        assert hub.model_directory(hub.DEFAULT_MODEL, revision="main") == hub.DEFAULT_MODEL_DIR


@pytest.mark.parametrize("flag", [True, np.True_, False, np.False_])
def test_token_and_local_files_only_take_the_same_flags(monkeypatch, flag):
    """token (besides a token string) and local_files_only take a flag by errors.is_flag's one rule: NumPy's bool
    as well as Python's. token=np.True_ was refused while local_files_only=np.True_ was taken; huggingface_hub
    gets a plain bool."""
    calls = []
    monkeypatch.setattr(hub, "snapshot_download", fake(calls, online="/online", cached="/cached"))
    assert hub.model_directory("acme/tiny", token=flag, local_files_only=flag) == ("/cached" if flag else "/online")
    assert all(type(c["token"]) is bool and c["token"] == bool(flag) for c in calls) and calls
    with pytest.raises(CheckpointError, match=r"^token must be a Hub token string, True or False, got 1$"):
        hub.model_directory("acme/tiny", token=1)
    with pytest.raises(CheckpointError, match=r"^local_files_only must be True or False, got 1$"):
        hub.model_directory("acme/tiny", local_files_only=1)


def test_local_model_is_the_one_test_of_what_a_revision_cannot_select(tmp_path):
    """hub.local_model decides both model_directory's warning and the CLI's --revision error."""
    assert hub.local_model(hub.DEFAULT_MODEL) == "the embedded default model"
    assert hub.local_model(tmp_path) == f"{tmp_path} (a local directory)"
    assert hub.local_model("acme/tiny") is None
    (tmp_path / "file").write_text("x")
    assert hub.local_model(tmp_path / "file") is None               # a file: model_directory's own error
