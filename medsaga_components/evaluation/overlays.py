"""Overlay PNGs for a quick visual check: image | ground truth | prediction, side by side.

Classes are colour-coded (same colour in both label panels) and blended over the image.
Slices are shown rotated by 90 degrees so the second array axis points up, which for an
axial slice of a RAS-ordered volume puts anterior at the top. Pillow only (no matplotlib).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from medsaga_components.io.atomic import atomic_path
from medsaga_components.data.slicing import check_axis, take_slice, volume_to_slices

# Class 1, 2, ... colours (RGB); chosen to stay distinguishable from each other and from grey.
CLASS_COLOURS = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
]
ALPHA = 0.45
TITLE_HEIGHT = 14
GAP = 4


def class_colour(index: int) -> tuple[int, int, int]:
    return CLASS_COLOURS[(index - 1) % len(CLASS_COLOURS)]


def _grey_rgb(image2d: np.ndarray) -> np.ndarray:
    """Float [A, B] -> uint8-range float RGB [A, B, 3] scaled by the slice's own min/max."""
    low, high = float(image2d.min()), float(image2d.max())
    grey = (image2d - low) / (high - low) if high > low else np.zeros_like(image2d, dtype=np.float64)
    return np.repeat((grey * 255.0)[..., None], 3, axis=-1)


def _blend(rgb: np.ndarray, classes: np.ndarray) -> np.ndarray:
    out = rgb.copy()
    for index in np.unique(classes):
        if index == 0:
            continue
        mask = classes == index
        out[mask] = (1 - ALPHA) * out[mask] + ALPHA * np.asarray(class_colour(int(index)), dtype=np.float64)
    return out


def overlay_panel(image2d: np.ndarray, ground_truth2d: np.ndarray, prediction2d: np.ndarray,
                  scale: int = 1) -> Image.Image:
    """Three slices [A, B] -> one RGB image: image | image+ground truth | image+prediction."""
    rgb = _grey_rgb(np.asarray(image2d, dtype=np.float64))
    panels = [rgb, _blend(rgb, np.asarray(ground_truth2d)), _blend(rgb, np.asarray(prediction2d))]
    panels = [np.rot90(p).clip(0, 255).astype(np.uint8) for p in panels]
    height, width = panels[0].shape[0] * scale, panels[0].shape[1] * scale
    canvas = Image.new("RGB", (3 * width + 2 * GAP, height + TITLE_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (panel, title) in enumerate(zip(panels, ("image", "ground truth", "prediction"))):
        tile = Image.fromarray(panel).resize((width, height), Image.NEAREST)
        canvas.paste(tile, (i * (width + GAP), TITLE_HEIGHT))
        draw.text((i * (width + GAP) + 2, 1), title, fill=(0, 0, 0))
    return canvas


def pick_slices(ground_truth: np.ndarray, axis: int, count: int) -> list[int]:
    """``count`` slice indices spread evenly over the slices with foreground (or over all)."""
    per_slice = volume_to_slices(ground_truth != 0, axis).reshape(ground_truth.shape[axis], -1).any(axis=1)
    candidates = np.flatnonzero(per_slice) if per_slice.any() else np.arange(ground_truth.shape[axis])
    positions = np.linspace(0, len(candidates) - 1, num=min(count, len(candidates)))
    return sorted({int(candidates[int(round(p))]) for p in positions})


def save_overlays(
    image: np.ndarray,
    ground_truth: np.ndarray,
    prediction: np.ndarray,
    out_dir: str | Path,
    axis: int = 2,
    slice_indices: Sequence[int] | None = None,
    max_slices: int = 3,
    prefix: str = "overlay",
) -> list[str]:
    """Write one PNG per slice; returns their paths.

    Args:
        image: [X, Y, Z] intensities (any range; each slice is scaled for display).
        ground_truth, prediction: [X, Y, Z] class indices.
        slice_indices: which slices along ``axis``; default ``max_slices`` spread over the
            slices with ground-truth foreground.
        prefix: file names are ``<prefix>_slice<NNN>.png``.
    """
    axis = check_axis(axis)
    image, ground_truth, prediction = np.asarray(image), np.asarray(ground_truth), np.asarray(prediction)
    if not image.shape == ground_truth.shape == prediction.shape:
        raise ValueError(f"image {image.shape}, ground truth {ground_truth.shape} and prediction "
                         f"{prediction.shape} must have one shape")
    indices = list(slice_indices) if slice_indices is not None else pick_slices(ground_truth, axis, max_slices)
    in_plane = [n for i, n in enumerate(image.shape) if i != axis]
    scale = max(1, 256 // max(in_plane))  # small slices are enlarged so they can be seen
    paths = []
    for index in indices:
        panel = overlay_panel(take_slice(image, index, axis), take_slice(ground_truth, index, axis),
                              take_slice(prediction, index, axis), scale)
        path = Path(out_dir) / f"{prefix}_slice{index:03d}.png"
        with atomic_path(path) as tmp:
            panel.save(tmp, format="PNG")
        paths.append(str(path))
    return paths
