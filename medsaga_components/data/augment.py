"""Light 2-D augmentation for few-shot training: random flips and small rotations.

Kept mild on purpose: with a handful of slices, strong deformations teach anatomy that does
not exist. Images rotate bilinearly, labels with nearest neighbour (class indices must stay
whole numbers).
"""

from __future__ import annotations

import math

from monai.transforms import Compose, RandFlipd, RandRotated


def augmentation_transforms(flip_prob: float = 0.5, rotate_prob: float = 0.5,
                            max_rotation_degrees: float = 15.0) -> Compose:
    """MONAI dictionary transform for ``{"image": [1, S, S], "label": [1, S, S]}`` samples."""
    keys = ["image", "label"]
    return Compose([
        RandFlipd(keys=keys, prob=flip_prob, spatial_axis=0, allow_missing_keys=True),
        RandFlipd(keys=keys, prob=flip_prob, spatial_axis=1, allow_missing_keys=True),
        RandRotated(keys=keys, range_x=math.radians(max_rotation_degrees), prob=rotate_prob,
                    mode=["bilinear", "nearest"], padding_mode="zeros", allow_missing_keys=True),
    ])
