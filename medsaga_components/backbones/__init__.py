"""Backbones by name: ``build_backbone("lite_medsam")``, ``build_backbone("vit_b", 512, path)``.

| name | encoder | pretrained weights | default size |
|---|---|---|---|
| ``lite_medsam`` | TinyViT (LiteMedSAM) | shipped, loaded by default | 256 |
| ``vit_b``, ``vit_l``, ``vit_h`` | SAM ViT | a path to the official file | 1024 |
| ``lite_medsam_tiny``, ``vit_tiny`` | small random configurations for tests | none | 256, 64 |
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

from medsaga_components.io.checkpoints import CheckpointError
from .lite_medsam import build_lite_medsam
from .sam_backbone import SamBackbone
from .sam_vit import VIT_SPECS, build_sam_vit

BACKBONES: dict[str, Callable[..., SamBackbone]] = {
    "lite_medsam": partial(build_lite_medsam, "lite_medsam"),
    "lite_medsam_tiny": partial(build_lite_medsam, "lite_medsam_tiny"),
    **{name: partial(build_sam_vit, name) for name in VIT_SPECS},
}


def build_backbone(name: str, image_size: int | None = None,
                   checkpoint: str | Path | None = "pretrained") -> SamBackbone:
    """Build a registered backbone.

    Args:
        name: a key of ``BACKBONES``.
        image_size: input side in pixels; None takes the backbone's default.
        checkpoint: ``"pretrained"`` loads the weights that exist offline (LiteMedSAM; other
            backbones then start random), a path loads that file (hash-checked for official
            SAM files), None gives random weights.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    if checkpoint == "pretrained" and name != "lite_medsam":
        if name in ("vit_b", "vit_l", "vit_h"):
            raise CheckpointError(
                f"no {name} weights exist offline: download {VIT_SPECS[name].url} and pass its path as checkpoint"
            )
        checkpoint = None
    if checkpoint in ("", "none", "None"):
        checkpoint = None
    return BACKBONES[name](image_size=image_size, checkpoint=checkpoint)


__all__ = ["BACKBONES", "build_backbone", "SamBackbone", "CheckpointError"]
