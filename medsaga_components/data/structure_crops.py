"""Crops around the labelled structures, scaled up to the network's side.

Small structures lie close together (the AAL task's four classes all sit in the middle third
of an axial slice), so one square around all of them, with a margin of surrounding anatomy,
shows them larger than the whole slice does (1.4 to 2 times on the AAL task's slices) and keeps
both hemispheres and the landmarks between them in view. Sliding windows (``data.zoom_crops``) zoom as much but
show a quarter of the slice, too little to tell the structures apart.

``StructureCropd`` trains on such squares (from the label) and on whole slices; at inference
``inference.zoom.StructureCropTwoPass`` finds the square from a first, whole-slice pass.
Both cut and scale with ``crop_square`` and use ``square_around`` for the square.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.transforms import MapTransform, Randomizable

from .dataset import _plain  # MetaTensor -> plain tensor, as the slice dataset does


def square_around(mask: torch.Tensor, margin: float, min_side: float) -> tuple[float, float, float] | None:
    """The square ``(centre_x, centre_y, side)`` in pixels (pixel ``i`` spans ``[i, i + 1)``)
    around the ``True`` pixels of ``mask`` ``[H, W]``: the bounding box's longer side plus
    ``margin`` times it on each side, at least ``min_side``. None when ``mask`` is empty.
    The square may reach past the slice; what lies outside reads as zeros."""
    rows = mask.any(dim=1).nonzero()
    cols = mask.any(dim=0).nonzero()
    if len(rows) == 0:
        return None
    y0, y1 = float(rows.min()), float(rows.max()) + 1
    x0, x1 = float(cols.min()), float(cols.max()) + 1
    side = max(y1 - y0, x1 - x0) * (1 + 2 * margin)
    return (x0 + x1) / 2, (y0 + y1) / 2, max(side, float(min_side))


def _theta(square: tuple[float, float, float], height: int, width: int) -> torch.Tensor:
    """Affine ``[2, 3]`` from the crop's normalised grid (-1..1) to the slice's (align_corners=False)."""
    cx, cy, side = square
    return torch.tensor([[side / width, 0.0, 2 * cx / width - 1], [0.0, side / height, 2 * cy / height - 1]])


def crop_square(image: torch.Tensor, square: tuple[float, float, float], size: int, mode: str = "bilinear") -> torch.Tensor:
    """``[C, H, W]`` -> ``[C, size, size]``: the square resampled (``bilinear`` for images,
    ``nearest`` for labels), zeros outside the slice."""
    grid = F.affine_grid(_theta(square, *image.shape[-2:])[None].to(image.device), [1, image.shape[0], size, size],
                         align_corners=False)
    return F.grid_sample(image[None].float(), grid, mode=mode, padding_mode="zeros", align_corners=False)[0]


def paste_square(whole: torch.Tensor, crop: torch.Tensor, square: tuple[float, float, float]) -> torch.Tensor:
    """``whole`` ``[C, H, W]`` with the square's pixels replaced by ``crop`` ``[C, s, s]``
    resampled back onto the slice's grid (bilinear): the inverse of ``crop_square``."""
    h, w = whole.shape[-2:]
    theta = _theta(square, h, w)
    scale = theta[:, :2].diagonal()
    inverse = torch.cat([torch.diag(1 / scale), (-theta[:, 2] / scale)[:, None]], dim=1)
    grid = F.affine_grid(inverse[None].to(whole.device, whole.dtype), [1, whole.shape[0], h, w], align_corners=False)
    back = F.grid_sample(crop[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    inside = (grid[0].abs() <= 1).all(dim=-1)  # [H, W]: slice pixels whose centre the square covers
    return torch.where(inside, back, whole)


class StructureCropd(Randomizable, MapTransform):
    """MONAI dictionary transform on ``{"image", "label"}`` ``[1, S, S]``: with probability
    ``1 - whole_prob`` the square around every labelled pixel (``square_around``), scaled to
    ``S`` (image bilinear, label nearest); otherwise, and for a slice without labels, the whole
    slice, so that the same network can make the first, whole-slice pass.

    The margin is drawn from ``margin_range`` and the centre shifted by up to ``shift`` of the
    side, so that the network meets squares as loose and as off-centre as a first pass finds.

    Args:
        whole_prob: share of samples left whole.
        margin_range: (low, high) margin on each side, as a fraction of the box's longer side.
        shift: largest shift of the centre along each axis, as a fraction of the side.
        min_side_fraction: the smallest square, as a fraction of S (1 / the largest zoom).
    """

    def __init__(self, whole_prob: float = 0.5, margin_range: tuple[float, float] = (0.15, 0.45), shift: float = 0.1,
                 min_side_fraction: float = 0.25) -> None:
        MapTransform.__init__(self, ("image", "label"))
        if not 0.0 <= whole_prob <= 1.0:
            raise ValueError(f"whole_prob must be in [0, 1], got {whole_prob!r}")
        if not 0.0 <= margin_range[0] <= margin_range[1]:
            raise ValueError(f"margin_range must be (low, high) with 0 <= low <= high, got {margin_range!r}")
        self.whole_prob = float(whole_prob)
        self.margin_range = (float(margin_range[0]), float(margin_range[1]))
        self.shift = float(shift)
        self.min_side_fraction = float(min_side_fraction)
        self._draw = (True, 0.0, 0.0, 0.0)

    def randomize(self, data=None) -> None:
        self._draw = (self.R.rand() < self.whole_prob, self.R.uniform(*self.margin_range),
                      self.R.uniform(-self.shift, self.shift), self.R.uniform(-self.shift, self.shift))

    def __call__(self, data: dict) -> dict:
        self.randomize()
        whole, margin, shift_x, shift_y = self._draw
        image, label = _plain(data["image"]), _plain(data["label"])
        size = label.shape[-1]
        square = None if whole else square_around(label[0] > 0, margin, self.min_side_fraction * size)
        if square is not None:
            cx, cy, side = square
            square = (cx + shift_x * side, cy + shift_y * side, side)
            image = crop_square(image, square, size)
            label = crop_square(label, square, size, mode="nearest").round().to(label.dtype)
        # plain tensors either way, so that whole slices and crops collate into one batch
        return {**data, "image": image.to(_plain(data["image"]).dtype), "label": label}
