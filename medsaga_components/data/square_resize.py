"""Fit a 2-D slice into an ``image_size`` x ``image_size`` square, and undo it exactly.

The longest side is scaled to ``image_size`` (aspect ratio kept) and the short side is
zero-padded at the bottom/right, so the slice sits in the top-left corner. The geometry
(original and resized height/width) is recorded so predictions map back onto the original
grid: crop the padding, then resize to the original size.

Label maps use "nearest-exact" sampling (pixel centres, integer arithmetic). With it,
upscaling and then undoing returns the original label map bit for bit; downscaling loses
detail finer than the new pixel, but the undo still lands on the exact original grid.

Network inputs and outputs go through one pair of functions, whichever path calls them
(``SliceDataset`` for training and test evaluation, ``SquareSliceInferer`` for ``run
inference``): ``fit_to_square`` prepares image slices, ``square_logits_to_slice`` crops the
padding off class logits and resizes them bilinearly to the slice's grid, and
``square_logits_to_labels`` takes the argmax there. Argmax after the bilinear resize gives
smoother boundaries than nearest-resizing the argmax taken at ``S x S``, and was the more
accurate of the two for a trained medsaga model on the demo's test slab z 70-90 (grey/white
matter Dice 0.934/0.941 against 0.927/0.933).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SquareGeometry:
    """Where a slice of ``height x width`` sits inside the ``image_size`` square."""

    height: int
    width: int
    resized_height: int
    resized_width: int
    image_size: int

    def as_tensor(self) -> torch.Tensor:
        """int64 [5]: (height, width, resized_height, resized_width, image_size); collates to [B, 5]."""
        return torch.tensor([self.height, self.width, self.resized_height, self.resized_width, self.image_size],
                            dtype=torch.int64)

    @classmethod
    def from_values(cls, values: Sequence[int] | torch.Tensor | np.ndarray) -> "SquareGeometry":
        """Inverse of ``as_tensor`` (accepts a tensor, array or list of 5 ints)."""
        flat = [int(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
        if len(flat) != 5:
            raise ValueError(f"square geometry needs 5 values (h, w, resized_h, resized_w, size), got {flat}")
        return cls(*flat)

    def to_square(self, coordinates: torch.Tensor) -> torch.Tensor:
        """Points ``[..., 2]`` (x, y) or boxes ``[..., 4]`` (x0, y0, x1, y1) in the slice's pixels
        -> the same in the square frame, clamped to it: pixel centres map to pixel centres,
        ``(p + 0.5) * resized / original - 0.5``, as the image itself is resized. The one place
        prompts are mapped into the network's frame (user prompts, prompts from a first pass)."""
        coordinates = torch.as_tensor(coordinates, dtype=torch.float32)
        if coordinates.shape[-1] not in (2, 4):
            raise ValueError(f"expected points [..., 2] (x, y) or boxes [..., 4] (x0, y0, x1, y1), "
                             f"got {tuple(coordinates.shape)}")
        scale = torch.tensor([self.resized_width / self.width, self.resized_height / self.height],
                             device=coordinates.device).repeat(coordinates.shape[-1] // 2)
        return ((coordinates + 0.5) * scale - 0.5).clamp(0.0, self.image_size - 1.0)


def square_geometry(height: int, width: int, image_size: int) -> SquareGeometry:
    if height < 1 or width < 1 or image_size < 1:
        raise ValueError(f"sizes must be positive, got height={height} width={width} image_size={image_size}")
    longest = max(height, width)
    # The longest side becomes exactly image_size; the other keeps the aspect ratio.
    resized_h = image_size if height == longest else max(1, round(height * image_size / longest))
    resized_w = image_size if width == longest else max(1, round(width * image_size / longest))
    return SquareGeometry(height, width, resized_h, resized_w, image_size)


def nearest_indices(out_len: int, in_len: int) -> np.ndarray:
    """Source index for each output pixel, sampling at pixel centres: floor((i + 0.5) * in / out).

    Integer arithmetic, so the result never depends on floating-point rounding.
    """
    i = np.arange(out_len, dtype=np.int64)
    return np.minimum(((2 * i + 1) * in_len) // (2 * out_len), in_len - 1)


def resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """[..., H, W] -> [..., height, width] by nearest-exact sampling (labels, class maps)."""
    rows = nearest_indices(height, array.shape[-2])
    cols = nearest_indices(width, array.shape[-1])
    return array[..., rows[:, None], cols[None, :]]


def resize_bilinear(tensor: torch.Tensor, height: int, width: int, antialias_when_shrinking: bool = True) -> torch.Tensor:
    """[..., H, W] float -> float32 [..., height, width] bilinear (antialiased when shrinking).

    Each [H, W] plane is resized on its own (planes as a batch of one channel): torch's
    kernel rounds differently for some channel counts (three, on this CPU), and a slice must
    come out bit for bit the same whether it is resized alone (``SliceDataset``) or with
    others (the inferer).
    """
    lead = tensor.shape[:-2]
    planes = tensor.float().reshape(-1, 1, *tensor.shape[-2:])
    shrinking = height < tensor.shape[-2] or width < tensor.shape[-1]
    out = F.interpolate(planes, size=(height, width), mode="bilinear", align_corners=False,
                        antialias=antialias_when_shrinking and shrinking)
    return out.reshape(*lead, height, width)


def resize_linear(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """[..., H, W] float -> [..., height, width] bilinear (antialiased when shrinking)."""
    return resize_bilinear(torch.as_tensor(np.ascontiguousarray(array, dtype=np.float32)), height, width).numpy()


def _pad_bottom_right(array: np.ndarray, image_size: int) -> np.ndarray:
    out = np.zeros((*array.shape[:-2], image_size, image_size), dtype=array.dtype)
    out[..., : array.shape[-2], : array.shape[-1]] = array
    return out


def fit_to_square(images: torch.Tensor, image_size: int) -> tuple[torch.Tensor, SquareGeometry]:
    """Image slices [..., H, W] float -> (float32 [..., S, S], geometry): the longest side
    scaled to S (bilinear, antialiased when shrinking), zero padding at the bottom/right.

    The one preparation of network inputs: training, test evaluation and inference all call it.
    """
    geometry = square_geometry(images.shape[-2], images.shape[-1], image_size)
    resized = resize_bilinear(images, geometry.resized_height, geometry.resized_width)
    padding = (0, image_size - geometry.resized_width, 0, image_size - geometry.resized_height)
    return F.pad(resized, padding), geometry


def resize_pad_image(image: np.ndarray, image_size: int) -> tuple[np.ndarray, SquareGeometry]:
    """Image slice [H, W] float -> (float32 [S, S], geometry): ``fit_to_square`` on an array."""
    square, geometry = fit_to_square(torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32)), image_size)
    return square.numpy(), geometry


def resize_pad_labels(labels: np.ndarray, image_size: int) -> tuple[np.ndarray, SquareGeometry]:
    """Label slice [H, W] int -> (int64 [S, S], geometry); nearest-exact, padding is background (0)."""
    geometry = square_geometry(labels.shape[-2], labels.shape[-1], image_size)
    resized = resize_nearest(np.asarray(labels, dtype=np.int64), geometry.resized_height, geometry.resized_width)
    return _pad_bottom_right(resized, image_size), geometry


def _crop(square: np.ndarray, geometry: SquareGeometry) -> np.ndarray:
    if square.shape[-2:] != (geometry.image_size, geometry.image_size):
        raise ValueError(f"expected a [..., {geometry.image_size}, {geometry.image_size}] array for this geometry, "
                         f"got shape {tuple(square.shape)}")
    return square[..., : geometry.resized_height, : geometry.resized_width]


def undo_resize_pad_labels(square: np.ndarray, geometry: SquareGeometry) -> np.ndarray:
    """Class map [..., S, S] -> [..., H, W] on the original grid (crop padding, nearest-exact)."""
    return resize_nearest(_crop(np.asarray(square), geometry), geometry.height, geometry.width)


def undo_resize_pad_image(square: np.ndarray, geometry: SquareGeometry) -> np.ndarray:
    """Float map [..., S, S] (image, probabilities) -> [..., H, W] (crop padding, bilinear)."""
    return resize_linear(_crop(np.asarray(square), geometry), geometry.height, geometry.width)


def square_logits_to_slice(logits: torch.Tensor, geometry: SquareGeometry) -> torch.Tensor:
    """Class logits [B, K, S, S] -> float32 [B, K, H, W] on the slice's own grid: the padding
    cropped off, then a bilinear resize (no antialiasing, so that undoing an upscale stays as
    sharp as the logits themselves). Take the argmax afterwards (``square_logits_to_labels``)."""
    if logits.ndim != 4 or logits.shape[-2:] != (geometry.image_size, geometry.image_size):
        raise ValueError(f"expected logits [B, K, {geometry.image_size}, {geometry.image_size}] for this geometry, "
                         f"got shape {tuple(logits.shape)}")
    cropped = logits[..., : geometry.resized_height, : geometry.resized_width]
    return resize_bilinear(cropped, geometry.height, geometry.width, antialias_when_shrinking=False)


def square_logits_to_labels(logits: torch.Tensor, geometry: SquareGeometry) -> torch.Tensor:
    """Class logits [B, K, S, S] -> int64 class indices [B, H, W] on the slice's own grid
    (``square_logits_to_slice``, then argmax over K)."""
    return square_logits_to_slice(logits, geometry).argmax(dim=1)
