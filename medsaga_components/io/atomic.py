"""Atomic file writes: write beside the target, then ``os.replace``.

A reader (a bundle, a second process, a rerun after Ctrl-C) then sees either the old file or
the complete new one, never a half-written file.

Files and folders written this way get the permissions any new file gets (``0o666`` or
``0o777`` less the process umask, e.g. ``0644``), not the private ``0600``/``0700`` of the
``tempfile`` module, because ``model.pt``, manifests and predictions are read by other users (a
serving process, a colleague). Errors name the target, never the temporary name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


class OutputWriteError(OSError):
    """An output file or folder cannot be written (read-only or missing location, disk full)."""


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the only portable way to read it is to set it and put it back
    os.umask(mask)
    return mask


def give_default_mode(path: str | Path) -> None:
    """Permissions of ``path`` as if created normally: 0o666 (files) / 0o777 (folders) less the umask."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~current_umask())


def _cannot_write(target: Path, exc: OSError) -> OutputWriteError:
    reason = exc.strerror or str(exc)
    if isinstance(exc, (NotADirectoryError, FileExistsError)) and not target.parent.is_dir():
        reason = f"{target.parent} is not a folder"
    error = OutputWriteError(f"cannot write {target}: {reason}")
    error.errno = exc.errno  # callers can still tell a full disk from a read-only folder
    return error


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed onto ``target``.

    The temporary name keeps the target's suffixes (``.nii.gz``, ``.png``) because writers such
    as nibabel and Pillow choose the format from them. On an exception the temporary file is
    removed and ``target`` is left as it was. An ``OSError`` (read-only folder, a file where a
    folder should be, disk full) becomes an ``OutputWriteError`` naming ``target``.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix="".join(target.suffixes) or ".tmp",
                                        dir=target.parent)
    except OSError as exc:
        raise _cannot_write(target, exc) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
        except OutputWriteError:
            raise
        except OSError as exc:
            raise _cannot_write(target, exc) from exc
        try:
            give_default_mode(tmp)
            os.replace(tmp, target)
        except OSError as exc:
            raise _cannot_write(target, exc) from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(target: str | Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json_atomic(target: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON; NaN/inf are refused so that no report hides one."""
    return write_text_atomic(target, json.dumps(payload, indent=2, allow_nan=False) + "\n")
