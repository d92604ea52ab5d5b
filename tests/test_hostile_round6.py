"""Hostile input, round 6: a review of round 5's mends (the temporaries of a failed write under a second Ctrl-C,
the save's clean-up after a failure, a Ctrl-C as its renames are planned).

As before, each test names what a user did and checks the answer against what is true of the files, the numbers
or the words: no file left unsaid, no Ctrl-C swallowed.
"""

import os

import pytest

from stablelm_ref import checkpoint
from stablelm_ref.errors import CheckpointError


# ---- class: a Ctrl-C swallowed (the removal of a failed write's temporaries) ------------------------------------

@pytest.mark.parametrize("where", ["alone", "in a group", "in a group, on the written file's"])
def test_a_ctrl_c_while_a_failed_write_s_temporaries_are_removed_is_not_swallowed(tmp_path, monkeypatch, where):
    """A write fails (an OSError: disk full) and the user presses Ctrl-C while its temporaries are removed: the
    removal is tried again and completes, and then the CheckpointError of the failed write was raised, as if no
    Ctrl-C had come; a caller that retries on CheckpointError went on. The undo of a failed rename (_commit) says
    so with a KeyboardInterrupt; so does this clean-up now, and nothing is left. In a group, the failing file's
    temporary is removed by atomic_open and the written one's (a.txt's) by atomic_group: a Ctrl-C on each (with
    only the first, atomic_group's own check could be removed with every test passing)."""
    (tmp_path / "a.txt").write_text("old")
    real_unlink, calls = os.unlink, []

    def unlink(path, **kwargs):
        calls.append(path)
        first = [c for c in calls if str(c).endswith("-a.txt")] if where.endswith("file's") else calls
        if len(first) == 1 and path == first[0]:
            raise KeyboardInterrupt                                      # the user's Ctrl-C, during the clean-up
        return real_unlink(path, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(BaseException) as info:             # not KeyboardInterrupt alone: another would end pytest
        if where == "alone":
            with checkpoint.atomic_open(str(tmp_path / "b.txt")) as f:
                f.write(b"half")
                raise OSError(28, "No space left on device")
        else:
            with checkpoint.atomic_group() as group:
                checkpoint.atomic_write(str(tmp_path / "a.txt"), b"new a", group)
                with checkpoint.atomic_open(str(tmp_path / "b.txt"), group) as f:
                    f.write(b"half")
                    raise OSError(28, "No space left on device")
    monkeypatch.undo()
    assert info.type is KeyboardInterrupt and "interrupted while removing the temporaries of a failed write (" in \
        str(info.value) and "No space left on device); nothing was changed" in str(info.value), repr(info.value)
    assert calls and os.listdir(tmp_path) == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old"


# ---- class: a file left unsaid (a Ctrl-C as a save's renames are planned) ---------------------------------------

@pytest.mark.parametrize("interrupts", [1, 3])
def test_a_ctrl_c_while_the_renames_are_planned_leaves_no_temporary_unsaid(tmp_path, monkeypatch, interrupts):
    """Every file of a save is written; _commit names each target's backup (secrets.token_hex) before its first
    rename. A Ctrl-C there came before the try that undoes a failed commit: the temporaries, a model's whole
    weights under hidden .tmp-* names, stayed, and the KeyboardInterrupt said nothing of them. They are removed
    now (a second Ctrl-C during that removal too: tried again; one interrupted twice is named), and the old files
    are as they were."""
    (tmp_path / "a.txt").write_text("old")
    real_token, real_unlink, tokens, unlinks = checkpoint.secrets.token_hex, os.unlink, [], []

    def token_hex(n):
        tokens.append(n)
        if len(tokens) == 2:                                             # the second file's backup name
            raise KeyboardInterrupt
        return real_token(n)

    def unlink(path, **kwargs):
        if str(path).endswith("-b.txt"):
            unlinks.append(path)
            if len(unlinks) < interrupts:
                raise KeyboardInterrupt                                  # a second (and third) Ctrl-C
        return real_unlink(path, **kwargs)

    monkeypatch.setattr(checkpoint.secrets, "token_hex", token_hex)
    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(BaseException) as info:
        with checkpoint.atomic_group() as group:
            checkpoint.atomic_write(str(tmp_path / "a.txt"), b"new a", group)
            checkpoint.atomic_write(str(tmp_path / "b.txt"), b"new b", group)
    monkeypatch.undo()
    assert info.type is (KeyboardInterrupt if interrupts == 1 else CheckpointError), repr(info.value)
    assert (tmp_path / "a.txt").read_text() == "old"
    left = sorted(n for n in os.listdir(tmp_path) if n != "a.txt")
    if interrupts == 1:
        assert left == []
        return
    (temporary,) = left
    assert temporary.startswith(".tmp-") and temporary.endswith("-b.txt")
    assert f"the temporary {tmp_path / temporary} could not be removed (interrupted): remove it" in str(info.value)
    # the Ctrl-C in words: a KeyboardInterrupt's text is "", so its type's name (_why); "cannot write b.txt ()" before
    assert f"cannot write {tmp_path / 'b.txt'} (KeyboardInterrupt); undoing the save failed" in str(info.value)
