"""Losses the method registry builds that MONAI does not have in one class."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn


class DiceBceLoss(nn.Module):
    """MCP-MedSAM's segmentation loss, per class: Dice (sigmoid, squared denominators) + binary
    cross-entropy, over the foreground channels of ``[B, N + 1, H, W]`` logits (per-class
    queries: channel 0 is the constant background) against ``[B, 1, H, W]`` class indices.

    A class that a prompt marks absent has logits of -1e4 (``network.ABSENT_CLASS_LOGIT``)
    and an empty target: it adds nothing to either term.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_bce: float = 1.0) -> None:
        super().__init__()
        self.lambda_dice = float(lambda_dice)
        self.lambda_bce = float(lambda_bce)
        self.dice = DiceLoss(to_onehot_y=True, sigmoid=True, include_background=False, squared_pred=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim != logits.ndim or target.shape[1] != 1:
            raise ValueError(f"expected logits [B, N + 1, ...] and class indices [B, 1, ...], got "
                             f"{tuple(logits.shape)} and {tuple(target.shape)}")
        classes = torch.arange(1, logits.shape[1], device=target.device).view(1, -1, *([1] * (target.ndim - 2)))
        onehot = (target.long() == classes).to(logits.dtype)  # [B, N, ...]
        bce = F.binary_cross_entropy_with_logits(logits[:, 1:], onehot)
        return self.lambda_dice * self.dice(logits, target) + self.lambda_bce * bce


__all__ = ["DiceBceLoss"]
