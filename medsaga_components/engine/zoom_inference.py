"""Prompt-free inference at a higher scale: the slice scaled by ``zoom`` and read by a
sliding window of the network's own side, for networks trained on zoomed crops
(``data.zoom_crops``).

:class:`ZoomedSlidingWindow` wraps a network like ``FlipAveraged`` does (test evaluation,
``run inference``, MONAI Label); :class:`ZoomInferer` is the same for a MONAI evaluator
(validation). With ``zoom`` 1 both are the network itself.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from monai.inferers import Inferer, sliding_window_inference
from torch import nn


def zoomed_logits(network: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, zoom: float,
                  overlap: float = 0.0) -> torch.Tensor:
    """``[B, C, S, S]`` image -> ``[B, N + 1, S, S]`` logits: the image resized to ``zoom * S``,
    read in ``S x S`` windows overlapping by ``overlap`` (Gaussian-weighted blend), the logits
    resized back to S (antialiased).

    Each window is a full forward pass: at ``zoom`` 2 without overlap that is 4 per slice (9
    with a quarter's overlap), which on CPU is what decides the cost of validation."""
    if image.ndim != 4:
        raise ValueError(f"expected image [B, C, S, S], got {tuple(image.shape)}")
    h, w = image.shape[-2:]
    big = F.interpolate(image, size=(int(round(h * zoom)), int(round(w * zoom))), mode="bilinear",
                        align_corners=False)
    logits = sliding_window_inference(big, roi_size=(h, w), sw_batch_size=4, predictor=network,
                                      overlap=overlap, mode="gaussian" if overlap else "constant")
    return F.interpolate(torch.as_tensor(logits), size=(h, w), mode="bilinear", align_corners=False, antialias=True)


class ZoomedSlidingWindow(nn.Module):
    """``network`` read at ``zoom`` times the scale: ``[B, C, S, S] -> [B, N + 1, S, S]``.

    Prompts are given in the pixels of the whole slice and would not match the windows, so
    extra arguments are refused (zoomed inference is for prompt-free networks).
    """

    def __init__(self, network: nn.Module, zoom: float, overlap: float = 0.0) -> None:
        super().__init__()
        if zoom <= 1:
            raise ValueError(f"zoom must be > 1 for a zoomed sliding window, got {zoom!r}")
        self.network = network
        self.zoom = float(zoom)
        self.overlap = float(overlap)

    def forward(self, image: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            raise ValueError("zoomed inference is prompt-free: the prompts' pixels would not match its windows")
        return zoomed_logits(self.network, image, self.zoom, self.overlap)


def with_zoom(network: nn.Module, zoom: float = 1.0) -> nn.Module:
    """``ZoomedSlidingWindow(network, zoom)`` when ``zoom`` > 1, else ``network`` itself."""
    if zoom < 1:
        raise ValueError(f"zoom must be >= 1 (1: the whole slice at once), got {zoom!r}")
    return ZoomedSlidingWindow(network, zoom) if zoom > 1 else network


class ZoomInferer(Inferer):
    """MONAI inferer: ``network`` on ``[B, C, S, S]`` inputs at ``zoom`` times the scale (1: as is)."""

    def __init__(self, zoom: float = 1.0) -> None:
        super().__init__()
        with_zoom(nn.Identity(), zoom)  # the same check as test evaluation and inference
        self.zoom = float(zoom)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        return with_zoom(network, self.zoom)(inputs, *args, **kwargs)
