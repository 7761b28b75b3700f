"""Writing files so that nothing is lost, and reading them so that nothing hostile gets through.

- :func:`atomic_write`: temp file in the same folder, fsync, rename, fsync of the folder —
  readers see the old file or the new one, never a partial one. The file gets the mode a plain
  ``open()`` would give it (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``.
  The destination must be a regular file or absent: a symlink, a device node or a folder at
  that path is refused (``OutputPathError``) rather than silently replaced.
- :func:`read_regular` / :func:`open_regular`: open only regular files (never a FIFO that would
  block, a device, or a folder) and only up to a size limit, so a tiny hostile path cannot hang
  or exhaust a reader. Every reader of user files (images, label maps, annotation JSON, cache
  entries, checkpoints) goes through them.
"""

from __future__ import annotations

import io
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from .errors import UserError

#: The largest small text file (config, pointer, results) any reader takes.
MAX_TEXT_BYTES = 64 * 2**20


class OutputPathError(UserError, ValueError):
    """An output path that would replace something that is not a regular file."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse to write onto anything but a regular file (or nothing).

    ``--out`` onto a symlink, a device node or a folder would replace it (or, for a symlink,
    write through it); the caller gets one clear error naming the path instead.
    """
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if stat.S_ISLNK(st.st_mode):
        raise OutputPathError(f"{path}: is a symbolic link; rmae does not write through links — "
                              "choose a new file name")
    if stat.S_ISDIR(st.st_mode):
        raise OutputPathError(f"{path}: is a folder; give a file name inside it, e.g. {path / 'out.safetensors'}")
    if not stat.S_ISREG(st.st_mode):
        raise OutputPathError(f"{path}: is not a regular file (a device, pipe or socket); choose a file name")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], durable: bool = True) -> Path:
    """Write ``path`` via ``write(tmp_path)``, fsync, then rename: readers never see a partial file.

    ``durable=False`` skips the two fsyncs: for caches of values that are recomputed when lost
    (region maps, generated scenes), where thousands of small writes would otherwise each wait for
    the disk; the rename still makes every file whole or absent."""
    path = check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """Strict JSON (no NaN / inf: they are not JSON and break other readers)."""
    text = json.dumps(obj, indent=indent, allow_nan=False)
    return atomic_write_text(path, text)


def is_regular_file(path: str | os.PathLike) -> bool:
    """True for a regular file (following symlinks); False for folders, FIFOs, devices, nothing."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def open_regular(path: str | os.PathLike, limit: int | None = None) -> BinaryIO:
    """A binary file object for reading a regular file (of at most ``limit`` bytes).

    Raises ``FileNotFoundError`` (missing), ``IsADirectoryError`` / ``ValueError`` (not a regular
    file, or too large) with a message naming the path. The file is opened with ``O_NONBLOCK`` and
    checked with ``fstat`` on the open descriptor, so a FIFO (even one swapped in after a
    ``stat``) cannot block the reader; the flag is cleared again for ordinary reads.
    """
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(f"{path}: is a folder, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: is not a regular file (a device, pipe or socket)")
        if limit is not None and st.st_size > limit:
            raise ValueError(f"{path}: {st.st_size} bytes is more than the {limit}-byte limit for this kind of file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return io.open(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (see :func:`open_regular`)."""
    chunks, total = [], 0
    with open_regular(path, limit) as f:
        while chunk := f.read(1 << 20):
            total += len(chunk)
            if total > limit:  # grew while we read it
                raise ValueError(f"{path}: more than the {limit}-byte limit for this kind of file")
            chunks.append(chunk)
    return b"".join(chunks)


def read_text(path: str | os.PathLike, limit: int = MAX_TEXT_BYTES) -> str:
    """:func:`read_regular` decoded as UTF-8 (``UnicodeDecodeError`` names no path; callers do)."""
    return read_regular(path, limit).decode("utf-8")


def save_state_dict(state_dict: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None,
                    safetensors: bool | None = None) -> Path:
    """Tensors → a file, atomically: safetensors (with ``metadata``) for ``.safetensors`` (or
    ``safetensors=True``), else ``torch.save`` (a plain dict of tensors, readable with
    ``weights_only=True``). Tensors are detached, made contiguous and moved to the CPU first.
    The one writer of weight files."""
    import torch
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    path = Path(path)
    if safetensors or (safetensors is None and path.suffix == ".safetensors"):
        return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=metadata))
    return atomic_write(path, lambda tmp: torch.save(sd, tmp))
