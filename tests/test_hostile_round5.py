"""Hostile input, round 5: a review of the mends of round 4's follow-up (the undo of a failed save under a second
Ctrl-C, the CPU fast form that follows edited params, the command line's hints).

As before, each test names what a user did and checks the answer against what is true of the files, the numbers
or the words; nothing is left half-written or said wrong.
"""

import os

import pytest

from stablelm_ref import checkpoint
from stablelm_ref.errors import CheckpointError


# ---- class: a wrong recovery instruction (the undo of a failed save) --------------------------------------------

@pytest.mark.parametrize("failure", [KeyboardInterrupt, lambda: OSError(13, "Permission denied")],
                         ids=["interrupted twice", "OSError"])
def test_a_new_file_the_undo_cannot_remove_is_named_as_new_not_with_a_backup(tmp_path, monkeypatch, failure):
    """A save writes a.txt (there before), b.txt (new) and c.txt (there before); the rename of c.txt to its backup
    fails, and the undo cannot remove the new b.txt (two Ctrl-Cs, or an OSError). The message said "b.txt could not
    be restored: its previous file is .old-...-b.txt, rename it back", a file that never existed, since b.txt had
    no previous file. It now says b.txt is new and to remove it; the old a.txt and c.txt are as they were."""
    for name in ("a.txt", "c.txt"):
        (tmp_path / name).write_text("old " + name)
    real_replace, real_unlink = os.replace, os.unlink

    def replace(src, dst, **kwargs):
        if src == str(tmp_path / "c.txt"):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst, **kwargs)

    def unlink(path, **kwargs):
        if path == str(tmp_path / "b.txt"):
            raise failure()
        return real_unlink(path, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(CheckpointError) as info:
        with checkpoint.atomic_group() as group:
            for name in ("a.txt", "b.txt", "c.txt"):
                checkpoint.atomic_write(str(tmp_path / name), b"new", group)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt", "c.txt"]          # no backup of b.txt exists
    assert (tmp_path / "a.txt").read_text() == "old a.txt" and (tmp_path / "c.txt").read_text() == "old c.txt"
    message = str(info.value)
    reason = "interrupted" if failure is KeyboardInterrupt else "Permission denied"
    assert f"{tmp_path / 'b.txt'} is new (there was no file of that name before the save) and could not be " \
           f"removed ({reason}): remove it" in message, message
    assert ".old-" not in message, message


@pytest.mark.parametrize("interrupts", [1, 2])
@pytest.mark.parametrize("where", ["the group's", "the file's own"])
def test_an_interrupt_while_removing_the_temporaries_of_a_failed_write_leaves_none_unnamed(tmp_path, monkeypatch,
                                                                                            interrupts, where):
    """A Ctrl-C while a save writes its second file (before any rename) removes the temporaries written so far: a
    second Ctrl-C during that removal stopped it, and the temporaries (a model's whole weights, under a hidden
    .tmp-* name) stayed, unreported; the undo of the renames tries each step twice, this clean-up did not. Now
    each removal is tried once more; one interrupted twice is named, to remove."""
    (tmp_path / "a.txt").write_text("old")
    real_unlink, calls = os.unlink, []
    doomed = "-a.txt" if where == "the group's" else "-b.txt"      # a.txt's temporary waits in the group

    def unlink(path, **kwargs):
        if os.path.basename(path).startswith(".tmp-") and path.endswith(doomed):
            calls.append(path)
            if len(calls) <= interrupts:
                raise KeyboardInterrupt
        return real_unlink(path, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    expected = KeyboardInterrupt if interrupts == 1 else CheckpointError
    with pytest.raises(expected) as info:
        with checkpoint.atomic_group() as group:
            checkpoint.atomic_write(str(tmp_path / "a.txt"), b"new a", group)
            with checkpoint.atomic_open(str(tmp_path / "b.txt"), group) as f:
                f.write(b"half of b")
                raise KeyboardInterrupt                                 # the user's first Ctrl-C
    monkeypatch.undo()
    left = sorted(n for n in os.listdir(tmp_path) if n != "a.txt")
    assert (tmp_path / "a.txt").read_text() == "old"
    if interrupts == 1:
        assert left == []
        return
    (temporary,) = left
    assert temporary.startswith(".tmp-") and temporary.endswith(doomed)
    assert f"the temporary {tmp_path / temporary} could not be removed (interrupted): remove it" in str(info.value)
