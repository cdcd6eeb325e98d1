"""Export a trained network as plain tensors that load into the plain SamSegmenter."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from medsaga_components.adapters.base import merge_adapters
from medsaga_components.io.atomic import atomic_path


def merged_copy(network: nn.Module) -> nn.Module:
    """A copy of ``network`` with every adapter (LoRA, SVD) folded into plain layers
    (``merge_adapters`` on a deep copy); ``network`` itself keeps training."""
    return merge_adapters(copy.deepcopy(network))


def plain_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the merged network: detached, contiguous CPU tensors only."""
    merged = merged_copy(network)
    return {k: v.detach().cpu().contiguous().clone() for k, v in merged.state_dict().items()}


def save_plain_model(network: nn.Module, path: str | Path) -> Path:
    """Write ``plain_state_dict(network)`` to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = plain_state_dict(network)
    with atomic_path(path) as tmp:  # readable by other users (umask), errors name ``path``
        torch.save(state, tmp)
    return path
