"""Loading weights and checkpoints from files: hash check, safe unpickling, strict state-dict load.

Every failure names the file and what was expected, so that a user who points a bundle at
the wrong file learns which file and why before any training starts.

``load_checkpoint`` is the one place where this package reads a PyTorch file. It unpickles with
``weights_only=True``: tensors, numbers, strings and plain containers (plus what was added with
``torch.serialization.add_safe_globals``, e.g. GaLore's optimiser state). A file that holds any
other Python object could run code while it is read, and is refused as unsafe; the error never
advises switching the check off.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt or does not fit the network."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds Python objects whose unpickling could run code; it is not loaded."""


# torch's weights-only unpickler starts its refusals with this sentence (torch 2.4 to 2.13 at least).
_WEIGHTS_ONLY_REFUSAL = "Weights only load failed"


def load_checkpoint(path: str | Path, what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    Raises ``CheckpointError`` when the file is missing or unreadable (truncated, not a PyTorch
    file) and ``UnsafeCheckpointError`` when it holds objects beyond tensors and plain
    containers. ``what`` says what the file is for in the messages ("model weights", ...).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        # "Unsupported operand" is a byte that is no pickle opcode at all: a corrupt file, not an unsafe one.
        if _WEIGHTS_ONLY_REFUSAL in message and "Unsupported operand" not in message:
            found = re.search(r"GLOBAL ([\w.]+)", message)
            culprit = f" such as {found.group(1)}" if found else ""
            # ``from None``: torch's own message (also printed in a chained traceback) suggests
            # loading with the check off, which is exactly what must not be done with this file.
            raise UnsafeCheckpointError(
                f"{what} {path} is refused as unsafe: it holds Python objects{culprit} beyond tensors and plain "
                "containers, and reading them could run code. Use a file saved as a state dict of tensors "
                "(models/model.pt is one), from a source you trust"
            ) from None
        raise CheckpointError(f"{what} {path} could not be read as a PyTorch file (no valid pickle data): "
                              "it is corrupt or not a checkpoint") from None
    except Exception as exc:  # zip, EOF and storage errors come in many types
        raise CheckpointError(f"{what} {path} could not be read as a PyTorch file ({type(exc).__name__}: "
                              f"{_first_line(str(exc))}): it is truncated, corrupt or not a checkpoint") from None


def _first_line(message: str) -> str:
    """The first line of a library's message, and nothing of it that proposes disabling weights_only."""
    line = message.strip().splitlines()[0].split(". ")[0] if message.strip() else "no detail"
    return "unreadable content" if "weights_only" in line else line


def sha256_of(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict of plain tensors from ``path`` after checking its sha256.

    Accepts a bare state dict or one nested under ``"model"``/``"state_dict"``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if expected_sha256 is not None:
        actual = sha256_of(path)
        if actual != expected_sha256:
            raise CheckpointError(
                f"checkpoint {path} has sha256 {actual}, expected {expected_sha256}: "
                "the file is corrupt, incomplete or a different model"
            )
    state = load_checkpoint(path, "checkpoint")
    for key in ("model", "state_dict"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a state dict")
    return dict(state)


def load_state_dict_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path, what: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with an error naming the file and the mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [f"{k}: file {tuple(state[k].shape)} vs network {tuple(own[k].shape)}"
                   for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        def head(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
        parts = [f"{name} {len(items)}: {head(items)}" for name, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shape)) if items]
        raise CheckpointError(f"checkpoint {source} does not fit the {what} architecture; " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
