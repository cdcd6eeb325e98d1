"""Training crops at a higher scale, centred on the classes: what small structures need.

A slice fitted into S px leaves a small structure a few cells of the decoder's S/4 grid (the
amygdala of the AAL task: about 12). ``zoomed_crop_transforms`` scales each training slice by
``zoom`` and cuts an S x S window out of it, centred on a pixel of a class drawn with equal
chance per class present (MONAI ``RandCropByLabelClassesd``), so that rare classes are seen as
often as common ones and at ``zoom`` times the detail. Inference then reads the same scale
with a sliding window (``inference.zoom``).
"""

from __future__ import annotations

from monai.transforms import Compose, MapTransform, RandCropByLabelClassesd, Randomizable, Resized


class _FirstSample(Randomizable, MapTransform):
    """``RandCropByLabelClassesd`` with ``num_samples=1`` returns a list of one sample; the
    slice dataset serves single samples."""

    def __init__(self, crop: RandCropByLabelClassesd) -> None:
        MapTransform.__init__(self, crop.keys)
        self.crop = crop

    def set_random_state(self, seed=None, state=None):
        self.crop.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:  # the crop draws its own centre
        pass

    def __call__(self, data):
        return self.crop(data)[0]


def zoomed_crop_transforms(image_size: int, zoom: float, num_classes: int, background_ratio: float = 1.0) -> Compose:
    """MONAI dictionary transform: ``{"image", "label"}`` ``[1, S, S]`` -> the same shapes, a
    window of the slice scaled by ``zoom`` (image bilinear, label nearest).

    Args:
        image_size: S.
        zoom: the scale (> 1), the same as inference's ``inference.zoom``.
        num_classes: N foreground classes (labels 0..N).
        background_ratio: weight of windows centred on background against 1 per foreground
            class, so that the network also learns that a window can hold no structure (most
            windows at inference hold none).
    """
    if zoom <= 1:
        raise ValueError(f"zoom must be > 1 for zoomed crops, got {zoom!r}")
    if background_ratio < 0:
        raise ValueError(f"background_ratio must be >= 0, got {background_ratio!r}")
    keys = ["image", "label"]
    side = int(round(image_size * zoom))
    return Compose([
        Resized(keys=keys, spatial_size=(side, side), mode=["bilinear", "nearest"]),
        _FirstSample(RandCropByLabelClassesd(keys=keys, label_key="label", spatial_size=(image_size, image_size),
                                             ratios=[background_ratio] + [1.0] * num_classes,
                                             num_classes=num_classes + 1, num_samples=1, warn=False)),
    ])
