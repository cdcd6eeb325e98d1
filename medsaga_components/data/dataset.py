"""``SliceDataset``: 2-D training/evaluation samples cut from the volumes of a Decathlon dataset.

Each sample is a dict that the default DataLoader collate and ``monai.engines.SupervisedTrainer``
accept as is::

    image        float32 [1, S, S] in [0, 1]     (S = image_size)
    label        int64   [1, S, S] class indices 0..N   (absent for unlabelled test images)
    image_path   str     the image file on disk
    volume       str     the image path as written in dataset.json
    slice_index  int
    axis         int
    geometry     int64 [5]  (height, width, resized_height, resized_width, image_size): see square_resize
    volume_shape int64 [3]  shape of the source volume

Volumes are read once per process and kept (normalised) in memory: few-shot data is small.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from medsaga_components.data.decathlon import DatasetError, DecathlonDataset, load_decathlon
from medsaga_components.data.intensity import CT_WINDOW, MRI_PERCENTILES, scale_intensity
from medsaga_components.data.labels import UndeclaredLabelError
from medsaga_components.data.manifest import Manifest, SliceRef, read_manifest
from medsaga_components.data.slicing import take_slice
from medsaga_components.data.square_resize import resize_pad_image, resize_pad_labels
from medsaga_components.data.volume_io import read_image, read_label

MANIFEST_PARTS = ("fewshot", "validation", "test")


def _plain(x):
    """MetaTensor (from MONAI transforms) -> plain tensor, so collate and ``torch.load`` stay simple."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


class SliceDataset(Dataset):
    """Samples for a list of (volume, slice) references.

    Args:
        dataset: the dataset (or its dataset.json path) the references point into; it gives
            the modality (intensity scaling) and the declared labels (class indices).
        slices: the slices to serve, in order.
        image_size: side S of the square the slices are fitted into.
        transform: optional MONAI dictionary transform applied to ``{"image", "label"}``
            (e.g. ``augmentation_transforms()``); the image is clipped back to [0, 1] and the
            label cast back to int64 afterwards, so the sample conventions always hold.
        allow_empty: accept an empty ``slices`` (a dataset that declares no test); otherwise
            an error names the dataset.
    """

    def __init__(
        self,
        dataset: DecathlonDataset | str | Path,
        slices: Sequence[SliceRef],
        image_size: int = 256,
        transform: Callable[[dict], dict] | None = None,
        ct_window: tuple[float, float] = CT_WINDOW,
        mri_percentiles: tuple[float, float] = MRI_PERCENTILES,
        allow_empty: bool = False,
    ):
        self.dataset = dataset if isinstance(dataset, DecathlonDataset) else load_decathlon(dataset)
        self.slices = list(slices)
        if not self.slices and not allow_empty:
            raise DatasetError(f"{self.dataset.path}: SliceDataset got no slices")
        self.image_size = int(image_size)
        self.transform = transform
        self.ct_window = tuple(ct_window)
        self.mri_percentiles = tuple(mri_percentiles)
        # volume path as in dataset.json -> (image in [0, 1], class indices or None, both [X, Y, Z])
        self._cache: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}

    @classmethod
    def from_manifest(
        cls,
        manifest: Manifest | str | Path,
        part: str = "fewshot",
        image_size: int = 256,
        transform: Callable[[dict], dict] | None = None,
        labelled_only: bool = False,
        allow_empty: bool = False,
        **kwargs,
    ) -> "SliceDataset":
        """Samples for one part of a few-shot manifest: ``fewshot``, ``validation`` or ``test``.

        ``validation``/``test`` serve every slice of their ranges (volumes are restacked from
        them); ``labelled_only`` keeps only slices with foreground.
        """
        if part not in MANIFEST_PARTS:
            raise ValueError(f"manifest part {part!r} unknown, expected one of {list(MANIFEST_PARTS)}")
        if not isinstance(manifest, Manifest):
            manifest = read_manifest(manifest)
        if part == "fewshot":
            refs = list(manifest.slices)
        else:
            refs = [ref for r in getattr(manifest, part) for ref in r.refs()]
            if not refs and not allow_empty:
                raise DatasetError(f"manifest for {manifest.dataset_json} has no {part} slices")
        dataset = cls(manifest.dataset_json, refs, image_size, transform, allow_empty=allow_empty, **kwargs)
        if labelled_only:
            dataset.slices = [ref for ref in refs if dataset.has_foreground(ref)]
        return dataset

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.dataset.class_names

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def __len__(self) -> int:
        return len(self.slices)

    def load_volume(self, volume: str, label: str | None) -> tuple[np.ndarray, np.ndarray | None]:
        """(image scaled to [0, 1], class-index map or None), both [X, Y, Z]; cached."""
        if volume not in self._cache:
            image, _ = read_image(self.dataset.resolve(volume), self.dataset.nonfinite_fill)
            image = scale_intensity(image, self.dataset.modality, self.ct_window, self.mri_percentiles)
            classes = None
            if label is not None:
                label_path = self.dataset.resolve(label)
                values, _ = read_label(label_path, self.dataset.resolve(volume), self.dataset.roi_labels)
                if values.shape != image.shape:
                    raise DatasetError(f"{label_path}: shape {values.shape} differs from image {volume} "
                                       f"shape {image.shape}")
                try:
                    classes = self.dataset.class_map.to_indices(values)
                except UndeclaredLabelError as exc:
                    raise DatasetError(f"{label_path}: {exc}") from exc
            self._cache[volume] = (image, classes)
        return self._cache[volume]

    def has_foreground(self, ref: SliceRef) -> bool:
        _, classes = self.load_volume(ref.volume, ref.label)
        return classes is not None and bool(np.any(take_slice(classes, ref.slice_index, ref.axis)))

    def __getitem__(self, index: int) -> dict:
        ref = self.slices[index]
        image_volume, class_volume = self.load_volume(ref.volume, ref.label)
        image, geometry = resize_pad_image(take_slice(image_volume, ref.slice_index, ref.axis), self.image_size)
        arrays = {"image": torch.from_numpy(image[None])}
        if class_volume is not None:
            labels, _ = resize_pad_labels(take_slice(class_volume, ref.slice_index, ref.axis), self.image_size)
            arrays["label"] = torch.from_numpy(labels[None])
        if self.transform is not None:
            arrays = self.transform(arrays)
            arrays["image"] = _plain(arrays["image"]).float().clamp_(0.0, 1.0)
            if "label" in arrays:
                arrays["label"] = _plain(arrays["label"]).round().long()
        return {
            **arrays,
            "image_path": str(self.dataset.resolve(ref.volume)),
            "volume": ref.volume,
            "slice_index": ref.slice_index,
            "axis": ref.axis,
            "geometry": geometry.as_tensor(),
            "volume_shape": torch.tensor(image_volume.shape, dtype=torch.int64),
        }
