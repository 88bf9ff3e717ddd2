"""Atomic file and folder writes: nothing a user made is ever half-written.

Every writer puts its bytes into a temporary sibling first and `os.replace`s it into place, so a
kill at any moment leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically.

    The temporary file keeps `path`'s suffix so writers that choose a format by extension
    (`.png`, `.keras`, `.weights.h5`) still work. On any exception it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    # Some writers refuse to overwrite an existing file; give them a free name.
    tmp.unlink()
    try:
        yield tmp
        if tmp.exists():
            with contextlib.suppress(OSError), open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (threads may be writing)."""
    with (
        contextlib.suppress(OSError, ValueError, StopIteration),
        open("/proc/self/status") as status,
    ):
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder beside `path`; on success rename it to `path`.

    The temporary folder's name starts with a dot and is not an integer, so neither TF Serving
    (which treats integer-named children as versions) nor a reader of the layout mistakes it for
    a finished folder. On any exception it is removed and `path` is untouched. Without
    `overwrite`, a `path` that appeared meanwhile (another process) is never replaced: a
    `FileExistsError` then. The folder gets the permissions of a plain `mkdir` (not the
    owner-only ones of a temporary folder), so a server running as another user can read it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists (written meanwhile by another process)")
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "old")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_output_folder(path: str | os.PathLike, *, overwrite: bool | None = None) -> Path:
    """`path` as a `Path` when a command may write its new `--out` folder there.

    Missing or an empty folder is fine; a file is refused; a non-empty folder is refused unless
    `overwrite` (None: the command has no `--overwrite` to offer). Reads only.

    Raises:
        FileExistsError: one line naming `--out` and what to do.
    """
    path = Path(path)
    if not path.exists():
        return path
    if not path.is_dir():
        raise FileExistsError(f"--out {path} is a file; choose a folder")
    if any(path.iterdir()) and not overwrite:
        hint = "" if overwrite is None else " or pass --overwrite"
        raise FileExistsError(f"--out {path} exists and is not empty; choose a new folder{hint}")
    return path
