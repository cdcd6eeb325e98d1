"""3-D volumes <-> stacks of 2-D slices along one axis, and slab sub-volumes.

Axis 2 (the default) gives axial slices for volumes stored in RAS-like order. A slice along
``axis`` keeps the other two axes in their original order, so ``slices_to_volume`` is the
exact inverse of ``volume_to_slices``.
"""

from __future__ import annotations

import numpy as np

AXIAL = 2


def check_axis(axis: int) -> int:
    if int(axis) not in (0, 1, 2):
        raise ValueError(f"slice axis must be 0, 1 or 2, got {axis!r}")
    return int(axis)


def num_slices(shape: tuple[int, ...], axis: int = AXIAL) -> int:
    return int(shape[check_axis(axis)])


def take_slice(volume: np.ndarray, index: int, axis: int = AXIAL) -> np.ndarray:
    """[X, Y, Z] -> the 2-D slice at ``index`` along ``axis`` (e.g. axis 2 -> [X, Y])."""
    axis = check_axis(axis)
    if not 0 <= index < volume.shape[axis]:
        raise IndexError(f"slice {index} out of range for axis {axis} of a volume with shape {volume.shape}")
    return np.take(volume, index, axis=axis)


def volume_to_slices(volume: np.ndarray, axis: int = AXIAL) -> np.ndarray:
    """[X, Y, Z] -> [N, A, B]: slice ``n`` is ``take_slice(volume, n, axis)``."""
    return np.moveaxis(volume, check_axis(axis), 0)


def slices_to_volume(slices: np.ndarray, axis: int = AXIAL) -> np.ndarray:
    """[N, A, B] -> the volume; exact inverse of ``volume_to_slices`` for the same axis."""
    return np.moveaxis(slices, 0, check_axis(axis))


def slab_affine(affine: np.ndarray, axis: int, start: int) -> np.ndarray:
    """Affine of ``volume[start:]`` along ``axis``: voxel 0 of the slab is voxel ``start`` of the volume."""
    shifted = np.array(affine, dtype=np.float64, copy=True)
    shifted[:3, 3] += shifted[:3, check_axis(axis)] * start
    return shifted


def crop_slab(volume: np.ndarray, affine: np.ndarray, axis: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(volume [X, Y, Z], affine) -> (slices ``start:stop`` along ``axis``, their affine)."""
    axis = check_axis(axis)
    if not 0 <= start < stop <= volume.shape[axis]:
        raise IndexError(f"slab [{start}, {stop}) out of range for axis {axis} of shape {volume.shape}")
    index = [slice(None)] * 3
    index[axis] = slice(start, stop)
    return volume[tuple(index)], slab_affine(affine, axis, start)
