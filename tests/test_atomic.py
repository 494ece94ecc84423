"""dsv2_jax.atomic: whole folders replaced atomically, crash leftovers recovered, normal modes."""

import os
import stat

import pytest

from dsv2_jax import atomic
from dsv2_jax.atomic import atomic_folder


def write(folder, text):
    with atomic_folder(folder) as tmp:
        (tmp / "model.safetensors").write_text(text)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_text(text)


def siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_replaces_a_folder_whole_and_leaves_nothing_beside_it(tmp_path):
    out = tmp_path / "model"
    write(out, "one")
    write(out, "two")
    assert (out / "model.safetensors").read_text() == "two" and (out / "sub" / "x").read_text() == "two"
    assert siblings(out) == []


def test_the_swap_is_one_atomic_exchange_on_linux(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("a")
    assert atomic._exchange(a, b)  # this filesystem supports RENAME_EXCHANGE
    assert (b / "f").read_text() == "a" and not (a / "f").exists()


def test_fallback_without_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "model"
    write(out, "one")
    write(out, "two")
    assert (out / "model.safetensors").read_text() == "two" and siblings(out) == []


def test_a_crash_between_the_two_renames_is_recovered(tmp_path):
    out = tmp_path / "model"
    write(out, "one")
    # What a crash after the first rename of the fallback leaves: the old folder, no target.
    os.replace(out, tmp_path / ".model.old-abc123")
    write(out, "two")  # this used to fail with ENOTEMPTY forever
    assert (out / "model.safetensors").read_text() == "two" and siblings(out) == []
    # ... and when nothing new is written, the next atomic_folder first puts the old one back.
    os.replace(out, tmp_path / ".model.old-def456")
    atomic.recover(out)
    assert (out / "model.safetensors").read_text() == "two" and siblings(out) == []


def test_an_error_leaves_the_old_folder_untouched(tmp_path):
    out = tmp_path / "model"
    write(out, "one")
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("disk full")
    assert (out / "model.safetensors").read_text() == "one" and siblings(out) == []


def test_results_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "model"
        write(out, "one")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "sub").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644
