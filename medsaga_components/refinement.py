"""BoundaryRefiner: a small convolutional head that corrects SAM's class logits with the image.

SAM's mask decoder sees the image only through the encoder's token grid (64 x 64 for a
256 px LiteMedSAM input) and upsamples 4x with transposed convolutions, so a structure
a few pixels thick, like the cortical grey-matter ribbon, gets boundaries drawn at token
scale. The refiner looks at the decoder's logits next to the image intensities at the
decoder's output resolution and adds a residual; its last layer starts at zero, so a
freshly built network predicts exactly what SAM's decoder does, and training moves
boundaries only where the image supports it (in the spirit of HQ-SAM's high-resolution
features, which a 256 px LiteMedSAM input does not have beyond the image itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BoundaryRefiner(nn.Module):
    """``logits [B, M, H, W]`` + ``image [B, C, S, S]`` -> refined ``logits [B, M, H, W]``.

    Three convolutions (3x3, 3x3, 1x1) with GELU between them: a 5 x 5 pixel view, enough
    to place an edge, too small to invent anatomy from a handful of slices.

    Args:
        num_masks: M, logit channels (N + 1 classes).
        hidden: channels of the hidden layers.
    """

    def __init__(self, num_masks: int, hidden: int = 32) -> None:
        super().__init__()
        if num_masks < 1 or hidden < 1:
            raise ValueError(f"num_masks and hidden must be positive, got {num_masks} and {hidden}")
        self.layers = nn.Sequential(
            nn.Conv2d(num_masks + 1, hidden, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, num_masks, kernel_size=1),
        )
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-2:] != logits.shape[-2:]:
            image = F.interpolate(image, size=logits.shape[-2:], mode="bilinear", align_corners=False,
                                  antialias=image.shape[-1] > logits.shape[-1])
        grey = image.mean(dim=1, keepdim=True)  # [B, 1, H, W]; RGB copies of a grey slice are equal
        return logits + self.layers(torch.cat([logits, grey], dim=1))
