"""Loading pretrained weights from files: hash check, then a strict state-dict load.

Every failure names the file and what was expected, so that a user who points a bundle at
the wrong file learns which file and why before any training starts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt or does not fit the network."""


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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(f"checkpoint {path} could not be read as a PyTorch state dict: {exc}") from exc
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
