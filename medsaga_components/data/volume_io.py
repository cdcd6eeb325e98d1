"""Reading the image and label files that a dataset.json lists: NIfTI volumes and 2-D PNGs.

Every reader returns a 3-D array and a 4x4 affine (voxel index -> world mm). A PNG becomes a
volume one slice deep ([H, W] -> [H, W, 1], identity affine) so that slicing along axis 2
handles 2-D data with no special case.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image


class VolumeReadError(ValueError):
    """An image or label file cannot be read as a single-channel 2-D/3-D array."""


def is_png(path: str | Path) -> bool:
    return str(path).lower().endswith(".png")


def is_nifti(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _check_format(path: Path) -> None:
    if not path.is_file():
        raise VolumeReadError(f"file not found: {path}")
    if not (is_png(path) or is_nifti(path)):
        raise VolumeReadError(f"{path}: unsupported file type, expected .nii, .nii.gz or .png")


def _as_3d(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """NIfTI shapes -> 3-D: a 2-D image gains a depth of 1, trailing singleton dims are dropped."""
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) == 2:
        dims.append(1)
    if len(dims) != 3:
        raise VolumeReadError(
            f"{path}: shape {tuple(shape)}, expected a single-channel 2-D or 3-D image "
            "(multi-channel 4-D volumes are not supported: store each channel as its own file)"
        )
    return int(dims[0]), int(dims[1]), int(dims[2])


def _load_nifti(path: Path) -> nib.Nifti1Image:
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises several unrelated types for corrupt files
        raise VolumeReadError(f"{path}: cannot be read as NIfTI: {exc}") from exc


def _png_array(path: Path, for_label: bool) -> np.ndarray:
    """PNG -> 2-D array [H, W]. Colour images become grey; colour masks are refused."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("L", "P", "I", "I;16", "I;16B", "I;16L", "F", "1"):
                array = np.asarray(img)
            elif for_label:
                raise VolumeReadError(
                    f"{path}: mask PNG has colour mode {mode!r}, expected a single-channel mask "
                    "(mode L, P or I) whose pixel values are the label values"
                )
            else:
                array = np.asarray(img.convert("L"))
    except VolumeReadError:
        raise
    except Exception as exc:
        raise VolumeReadError(f"{path}: cannot be read as PNG: {exc}") from exc
    if array.ndim != 2:
        raise VolumeReadError(f"{path}: PNG decoded to shape {array.shape}, expected [H, W]")
    return array


def read_geometry(path: str | Path) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape (3-D) and affine [4, 4] of a file, from its header only where possible."""
    path = Path(path)
    _check_format(path)
    if is_png(path):
        try:
            with Image.open(path) as img:
                width, height = img.size
        except Exception as exc:
            raise VolumeReadError(f"{path}: cannot be read as PNG: {exc}") from exc
        return (height, width, 1), np.eye(4)
    img = _load_nifti(path)
    return _as_3d(img.shape, path), np.asarray(img.affine, dtype=np.float64)


def read_image(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Image -> (float32 array [X, Y, Z] in the file's own units, affine [4, 4])."""
    path = Path(path)
    _check_format(path)
    if is_png(path):
        return _png_array(path, for_label=False).astype(np.float32)[:, :, None], np.eye(4)
    img = _load_nifti(path)
    shape = _as_3d(img.shape, path)
    data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    return data, np.asarray(img.affine, dtype=np.float64)


def read_label(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Label map -> (int64 array [X, Y, Z] of label values, affine [4, 4]).

    Labels stored as floats are accepted only when every value is a whole number, because a
    fractional label (a resampled mask, a probability map) has no class.
    """
    path = Path(path)
    _check_format(path)
    if is_png(path):
        return _png_array(path, for_label=True).astype(np.int64)[:, :, None], np.eye(4)
    img = _load_nifti(path)
    shape = _as_3d(img.shape, path)
    raw = np.asanyarray(img.dataobj).reshape(shape)
    if not np.issubdtype(raw.dtype, np.integer):
        rounded = np.rint(raw)
        if not np.array_equal(rounded, raw):
            raise VolumeReadError(f"{path}: label map holds non-integer values, expected whole-number label values")
        raw = rounded
    return raw.astype(np.int64), np.asarray(img.affine, dtype=np.float64)
