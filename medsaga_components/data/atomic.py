"""Atomic file writes: write beside the target, then ``os.replace``.

A reader (a bundle, a second process, a rerun after Ctrl-C) then sees either the old file or
the complete new one, never a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed onto ``target``.

    The temporary name keeps the target's suffixes (``.nii.gz``, ``.png``) because writers such
    as nibabel and Pillow choose the format from them. On an exception the temporary file is
    removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix="".join(target.suffixes) or ".tmp",
                                    dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
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
