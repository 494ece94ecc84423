"""Writing a folder atomically: readers see the old folder or the new one, never half of one.

``atomic_folder(folder)`` yields a temporary folder beside ``folder``; when the block succeeds
every file in it is flushed to disk (``fsync``) and it takes ``folder``'s place:

- on Linux, in one step: ``renameat2(RENAME_EXCHANGE)`` swaps the two folders atomically, so
  ``folder`` exists at every instant; the old contents, now under the temporary name, are
  removed afterwards;
- elsewhere, or where the filesystem cannot exchange, by two renames through a uniquely named
  ``.NAME.old-*`` folder. A crash between them leaves that folder behind; the next
  ``atomic_folder`` for the same target puts it back (when ``folder`` is missing) or removes it.

On error (an exception, Ctrl-C) the temporary folder is removed and ``folder`` is untouched.
The result is readable by others as a normal folder would be (``0o777 & ~umask`` for folders,
``0o666 & ~umask`` for files), not the ``0o700`` of ``tempfile.mkdtemp``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc if hasattr(libc, "renameat2") else None
    except OSError:
        return None


_LIBC = _libc()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the OS or filesystem cannot."""
    if _LIBC is None:
        return False
    rc = _LIBC.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path, mode_files: int, mode_dirs: int) -> None:
    """Give every file and folder under ``root`` normal permissions and flush it to disk."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            os.chmod(path, mode_files)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(dirpath, mode_dirs)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(folder: Path) -> None:
    """Undo what a crash between the two renames of the fallback left: put a lone
    ``.NAME.old-*`` folder back when ``folder`` is missing, else remove the leftovers."""
    folder = Path(folder)
    leftovers = sorted(folder.parent.glob(f".{folder.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if leftovers and not folder.exists():
        os.replace(leftovers.pop(), folder)  # the newest holds what ``folder`` was
    for old in leftovers:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(folder: Path):
    """Yield a temporary folder beside ``folder``; when the block succeeds it replaces
    ``folder`` (see the module docstring). On error the temporary folder is removed and
    ``folder`` is untouched.

    Example::

        with atomic_folder("exports/my-model") as tmp:
            (tmp / "config.json").write_text("{}")
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        mask = _umask()
        _fsync_tree(tmp, 0o666 & ~mask, 0o777 & ~mask)
        if not folder.exists():
            os.replace(tmp, folder)
        elif _exchange(tmp, folder):
            shutil.rmtree(tmp)  # tmp now holds the old contents
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old)  # replaces the empty placeholder
            os.replace(tmp, folder)
            shutil.rmtree(old)
        _fsync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
