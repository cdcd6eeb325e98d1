"""Prompt-free inference at a higher scale, for networks trained on zoomed crops.

The bundles' ``zoom`` key takes three kinds of value (``zoom_setting``):

* 1: the whole slice at once (the default);
* a number > 1: the slice scaled by ``zoom`` and read by a sliding window of the network's own
  side (:class:`ZoomedSlidingWindow`; trained on ``data.zoom_crops``);
* ``"structures"``: two passes of one network, the whole slice first, then the square around
  what it found, scaled to the network's side (:class:`StructureCropTwoPass`; trained on
  ``data.structure_crops``).

``with_zoom`` wraps a network like ``FlipAveraged`` does (test evaluation, ``run inference``,
MONAI Label); :class:`ZoomInferer` is the same for a MONAI evaluator (validation).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from monai.inferers import Inferer, sliding_window_inference
from torch import nn

from medsaga_components.data.structure_crops import crop_square, paste_square, square_around

STRUCTURES = "structures"


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


class _PromptFreeReading(nn.Module):
    """A network read another way than whole-slice at once; prompts given in the whole slice's
    pixels would not match what it reads, so extra arguments are refused."""

    refusal = "this reading is prompt-free"

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            raise ValueError(self.refusal)
        if image.ndim != 4:
            raise ValueError(f"expected image [B, C, S, S], got {tuple(image.shape)}")
        return self.read(image)

    def read(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ZoomedSlidingWindow(_PromptFreeReading):
    """``network`` read at ``zoom`` times the scale: ``[B, C, S, S] -> [B, N + 1, S, S]``.

    Prompts are given in the pixels of the whole slice and would not match the windows, so
    extra arguments are refused (zoomed inference is for prompt-free networks).
    """

    refusal = "zoomed inference is prompt-free: the prompts' pixels would not match its windows"

    def __init__(self, network: nn.Module, zoom: float, overlap: float = 0.0) -> None:
        super().__init__(network)
        if zoom <= 1:
            raise ValueError(f"zoom must be > 1 for a zoomed sliding window, got {zoom!r}")
        self.zoom = float(zoom)
        self.overlap = float(overlap)

    def read(self, image: torch.Tensor) -> torch.Tensor:
        return zoomed_logits(self.network, image, self.zoom, self.overlap)


class StructureCropTwoPass(_PromptFreeReading):
    """``network`` in two passes: ``[B, C, S, S] -> [B, N + 1, S, S]``.

    The first pass reads the whole slice; the square around every pixel it assigns to a class
    (``data.structure_crops.square_around``, ``margin`` of the box's longer side on each side)
    is scaled to S and read again, and its logits replace the first pass's inside the square.
    A slice where the first pass finds nothing keeps the first pass's logits. The network is
    the one trained with ``StructureCropd``, which shows it both whole slices and such squares.
    """

    refusal = "zoom 'structures' is prompt-free: the prompts' pixels would not match the crop"

    def __init__(self, network: nn.Module, margin: float = 0.3, min_side_fraction: float = 0.25) -> None:
        super().__init__(network)
        self.margin = float(margin)
        self.min_side_fraction = float(min_side_fraction)

    def read(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.network(image)
        size = image.shape[-1]
        squares = [square_around(found > 0, self.margin, self.min_side_fraction * size)
                   for found in logits.argmax(dim=1)]
        chosen = [i for i, square in enumerate(squares) if square is not None]
        if not chosen:
            return logits
        crops = self.network(torch.stack([crop_square(image[i], squares[i], size) for i in chosen]))
        pasted = list(logits.unbind(0))
        for crop, i in zip(crops, chosen):
            pasted[i] = paste_square(logits[i], crop, squares[i])
        return torch.stack(pasted)


def zoom_setting(value: Any) -> float | str:
    """The ``zoom`` key read: a number >= 1, or ``"structures"`` (any case); else an error naming it."""
    if isinstance(value, str) and value.strip().lower() == STRUCTURES:
        return STRUCTURES
    try:
        zoom = float(value)
    except (TypeError, ValueError):
        zoom = None
    if zoom is None or not zoom >= 1:
        raise ValueError(f"zoom must be a number >= 1 (1: the whole slice at once) or {STRUCTURES!r}, got {value!r}")
    return zoom


def with_zoom(network: nn.Module, zoom: float | str = 1.0) -> nn.Module:
    """``network`` read at the ``zoom`` setting: ``StructureCropTwoPass`` for ``"structures"``,
    ``ZoomedSlidingWindow`` for a number > 1, the network itself for 1."""
    zoom = zoom_setting(zoom)
    if zoom == STRUCTURES:
        return StructureCropTwoPass(network)
    return ZoomedSlidingWindow(network, zoom) if zoom > 1 else network


class ZoomInferer(Inferer):
    """MONAI inferer: ``network`` on ``[B, C, S, S]`` inputs at the ``zoom`` setting (1: as is)."""

    def __init__(self, zoom: float | str = 1.0) -> None:
        super().__init__()
        self.zoom = zoom_setting(zoom)  # the same check as test evaluation and inference

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        return with_zoom(network, self.zoom)(inputs, *args, **kwargs)
