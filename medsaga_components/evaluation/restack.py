"""Slice predictions -> a volume on the original grid -> a NIfTI file.

The inverse of the data path for class maps: each predicted [S, S] class map has its
bottom/right padding cropped and is resized back (nearest-exact) to the original slice size,
and the slices are stacked along the axis they were cut from. The volume keeps the source
affine, so it overlays the original image in any viewer. (Networks' class logits are brought
back before the argmax instead, by ``data.square_resize.square_logits_to_labels``.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch

from medsaga_components.io.atomic import atomic_path
from medsaga_components.data.labels import ClassMap
from medsaga_components.data.slicing import check_axis, slices_to_volume
from medsaga_components.data.square_resize import SquareGeometry, undo_resize_pad_labels


def _as_numpy(array) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def _one_geometry(geometry) -> SquareGeometry:
    """One geometry from a SquareGeometry, a [5] vector, or [N, 5] rows that must all agree."""
    if isinstance(geometry, SquareGeometry):
        return geometry
    values = _as_numpy(geometry).astype(np.int64)
    if values.ndim == 2:
        if not (values == values[0]).all():
            raise ValueError(f"slices of one volume must share one geometry, got rows {np.unique(values, axis=0).tolist()}")
        values = values[0]
    return SquareGeometry.from_values(values)


def restack_volume(
    slice_predictions: np.ndarray | torch.Tensor,
    geometry: SquareGeometry | Sequence[int] | np.ndarray | torch.Tensor,
    axis: int = 2,
    slice_indices: Sequence[int] | None = None,
    volume_shape: Sequence[int] | None = None,
    class_map: ClassMap | None = None,
) -> np.ndarray:
    """Class-index predictions for slices -> int64 volume on the original grid.

    Args:
        slice_predictions: [N, S, S] (or [N, 1, S, S]) class indices, in slice order.
        geometry: the samples' ``geometry`` ([5] or [N, 5], see ``SquareGeometry``).
        axis: the axis the slices were cut along.
        slice_indices, volume_shape: where the N slices go in a volume of ``volume_shape``
            ([X, Y, Z]); slices not given stay background. Without them the N slices form the
            whole volume, slice n at position n.
        class_map: if given, class indices are mapped back to the dataset's label values.

    Returns:
        int64 [X, Y, Z].
    """
    axis = check_axis(axis)
    predictions = _as_numpy(slice_predictions)
    if predictions.ndim == 4 and predictions.shape[1] == 1:
        predictions = predictions[:, 0]
    if predictions.ndim != 3:
        raise ValueError(f"slice predictions must be [N, S, S] class indices, got shape {predictions.shape}")
    slices = undo_resize_pad_labels(predictions.astype(np.int64), _one_geometry(geometry))  # [N, H, W]
    if slice_indices is None:
        volume = slices_to_volume(slices, axis)
    else:
        if volume_shape is None:
            raise ValueError("slice_indices needs volume_shape (the [X, Y, Z] shape of the source volume)")
        if len(slice_indices) != len(slices):
            raise ValueError(f"{len(slice_indices)} slice indices for {len(slices)} predicted slices")
        stacked = np.zeros((int(volume_shape[axis]), *slices.shape[1:]), dtype=np.int64)
        stacked[np.asarray(slice_indices, dtype=np.int64)] = slices
        volume = slices_to_volume(stacked, axis)
        if volume.shape != tuple(int(s) for s in volume_shape):
            raise ValueError(f"restacked shape {volume.shape} differs from volume_shape {tuple(volume_shape)}: "
                             "the geometry does not belong to this volume")
    volume = np.ascontiguousarray(volume)
    return class_map.to_values(volume) if class_map is not None else volume


def _storage_dtype(volume: np.ndarray) -> np.dtype:
    """Smallest NIfTI-friendly dtype that holds ``volume`` (label maps are mostly uint8)."""
    if np.issubdtype(volume.dtype, np.floating):
        return np.dtype(np.float32)
    low, high = (int(volume.min()), int(volume.max())) if volume.size else (0, 0)
    for dtype in (np.uint8, np.int16, np.int32):
        if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def save_nifti(volume: np.ndarray, affine: np.ndarray, path: str | Path) -> str:
    """Write ``volume`` [X, Y, Z] with ``affine`` [4, 4] as NIfTI (atomically); returns the path."""
    volume = np.asarray(volume)
    path = Path(path)
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        raise ValueError(f"{path}: expected a .nii or .nii.gz file name")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine for {path} must be [4, 4], got {affine.shape}")
    image = nib.Nifti1Image(volume.astype(_storage_dtype(volume)), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return str(path)
