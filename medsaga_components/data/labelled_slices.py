"""Which slices of which volumes contain which classes.

Few-shot selection and the validation/test hold-out both work on this index: a slice is
"labelled" when it holds at least one foreground voxel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medsaga_components.data.decathlon import DatasetEntry, DecathlonDataset, DatasetError
from medsaga_components.data.labels import UndeclaredLabelError
from medsaga_components.data.manifest import SliceRef
from medsaga_components.data.slicing import check_axis, volume_to_slices


@dataclass(frozen=True)
class LabelledSlice:
    volume_order: int  # position of the volume in its split (keeps selections in a stable order)
    ref: SliceRef
    classes: frozenset[int]  # foreground class indices present in the slice


@dataclass(frozen=True)
class VolumeSlices:
    entry: DatasetEntry
    volume_order: int
    num_slices: int
    labelled: tuple[LabelledSlice, ...]  # ascending slice index


def scan_volume(dataset: DecathlonDataset, entry: DatasetEntry, volume_order: int, axis: int) -> VolumeSlices:
    """Read one label map and list its slices along ``axis`` that contain foreground."""
    axis = check_axis(axis)
    if entry.label_path is None:
        raise DatasetError(f"{dataset.path}: {entry.image} has no label; few-shot slices need label maps")
    values = dataset.read_label(entry)
    try:
        classes = volume_to_slices(dataset.class_map.to_indices(values), axis)  # [N, A, B]
    except UndeclaredLabelError as exc:
        raise DatasetError(f"{entry.label_path}: {exc}") from exc
    # presence[c, n]: class c occurs in slice n (one pass per class instead of per slice).
    presence = np.stack([np.any(classes == c, axis=(1, 2)) for c in range(1, dataset.num_classes)])
    labelled = []
    for n in np.flatnonzero(presence.any(axis=0)):
        present = frozenset(int(c) + 1 for c in np.flatnonzero(presence[:, n]))
        labelled.append(LabelledSlice(volume_order, SliceRef(entry.image, entry.label, axis, int(n)), present))
    return VolumeSlices(entry, volume_order, int(classes.shape[0]), tuple(labelled))


def scan_split(dataset: DecathlonDataset, split: str, axis: int) -> list[VolumeSlices]:
    return [scan_volume(dataset, entry, i, axis) for i, entry in enumerate(dataset.entries(split))]
