"""Reading the image and label files that a dataset.json lists: NIfTI volumes, 2-D PNGs, DICOM
series (a folder) with RTSTRUCT labels (a ``.dcm`` file).

Every reader returns a 3-D array and a 4x4 affine (voxel index -> world mm). A PNG becomes a
volume one slice deep ([H, W] -> [H, W, 1], identity affine) so that slicing along axis 2
handles 2-D data with no special case. A DICOM series is read by MONAI's ``PydicomReader``
after ``dicom_series.check_series``; an RTSTRUCT is rasterised onto its series' grid
(``rtstruct``), which is why ``read_label`` then needs the image and the ROI-to-label mapping.

A file is only trusted once its voxels have been read: a truncated ``.nii.gz`` has a valid
header and fails only when its data are decompressed, so every reader decompresses the whole
array and turns any failure into a ``VolumeReadError`` naming the file. Images must be finite:
a single NaN makes the intensity percentiles, every scaled slice and the loss NaN. Non-finite
voxels are refused unless the caller gives a value to replace them with (``nonfinite_fill``;
a dataset.json sets it with the key ``"nonfinite_fill"``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import nibabel as nib
import numpy as np
from PIL import Image

from medsaga_components.data.dicom_series import check_series, is_dicom_series, read_dicom_series
from medsaga_components.data.errors import NonFiniteVoxelsError, VolumeReadError
from medsaga_components.data.rtstruct import is_rtstruct, read_rtstruct


logger = logging.getLogger(__name__)


def is_png(path: str | Path) -> bool:
    return str(path).lower().endswith(".png")


def is_nifti(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _check_format(path: Path) -> None:
    if not path.is_file():
        raise VolumeReadError(f"file not found: {path}")
    if not (is_png(path) or is_nifti(path)):
        raise VolumeReadError(f"{path}: unsupported file type, expected .nii, .nii.gz or .png, or a folder "
                              "holding one DICOM series")


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


def _nifti_voxels(img: nib.Nifti1Image, path: Path, as_float: bool) -> np.ndarray:
    """All voxels of ``img`` (decompressed now, so a truncated or corrupt file fails here)."""
    try:
        if as_float:
            return np.asarray(img.get_fdata(dtype=np.float32))
        return np.asarray(img.dataobj)
    except Exception as exc:  # EOFError, zlib.error, ValueError ("buffer is too small"), OSError...
        raise VolumeReadError(
            f"{path}: voxel data cannot be read ({type(exc).__name__}: {exc}); expected "
            f"{int(np.prod(img.shape))} voxels of shape {tuple(img.shape)} as the header says: the file is "
            "truncated or corrupt (an interrupted copy or download?)"
        ) from exc


def replace_nonfinite(data: np.ndarray, path: str | Path, fill: float | None) -> np.ndarray:
    """``data`` with NaN/inf voxels refused (``fill`` None) or replaced by ``fill`` (in place).

    Raises ``NonFiniteVoxelsError`` naming the file and the count.
    """
    finite = np.isfinite(data)
    count = int(data.size - np.count_nonzero(finite))
    if not count:
        return data
    nan = int(np.count_nonzero(np.isnan(data)))
    what = f"{count} of {data.size} voxels are not finite ({nan} NaN, {count - nan} infinite)"
    if fill is None:
        raise NonFiniteVoxelsError(
            f"{path}: {what}; expected finite intensities. Fix the file, or ask for them to be replaced by "
            "setting \"nonfinite_fill\": <value> (e.g. 0) in dataset.json"
        )
    logger.warning("%s: %s; replaced by %s (dataset.json nonfinite_fill)", path, what, fill)
    data[~finite] = fill
    return data


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
    if is_dicom_series(path):
        info = check_series(path)  # headers only
        return info.shape, info.affine
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


def _open_volume(path: Path):
    """The NIfTI image at ``path`` (header read, voxels not yet), or None for a PNG; an unknown
    format is an error naming the file."""
    _check_format(path)
    return None if is_png(path) else _load_nifti(path)


def read_image(path: str | Path, nonfinite_fill: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Image -> (float32 array [X, Y, Z] in the file's own units, affine [4, 4]).

    NaN/inf voxels raise ``NonFiniteVoxelsError`` unless ``nonfinite_fill`` gives their value.
    """
    path = Path(path)
    if is_dicom_series(path):
        data, affine = read_dicom_series(path)
        return replace_nonfinite(data, path, nonfinite_fill), affine
    img = _open_volume(path)
    if img is None:
        return _png_array(path, for_label=False).astype(np.float32)[:, :, None], np.eye(4)
    data = _nifti_voxels(img, path, as_float=True).reshape(_as_3d(img.shape, path))
    if not data.flags.writeable:
        data = data.copy()
    return replace_nonfinite(data, path, nonfinite_fill), np.asarray(img.affine, dtype=np.float64)


def read_label(path: str | Path, image: str | Path | None = None,
               roi_labels: Mapping[str, int | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Label map -> (int64 array [X, Y, Z] of label values, affine [4, 4]).

    Labels stored as floats are accepted only when every value is a whole number, because a
    fractional label (a resampled mask, a probability map) has no class. An RTSTRUCT (``.dcm``)
    is rasterised onto ``image`` (its DICOM series folder), its ROIs named by ``roi_labels``
    (``DecathlonDataset.roi_labels``: ROI name -> label value, None to leave one out).
    """
    path = Path(path)
    if is_rtstruct(path):
        if image is None or roi_labels is None or not is_dicom_series(image):
            raise VolumeReadError(f"{path}: an RTSTRUCT label needs its image, a DICOM series folder, and the "
                                  f"dataset's label names to be read (got image {image})")
        return read_rtstruct(path, image, roi_labels)
    img = _open_volume(path)
    if img is None:
        return _png_array(path, for_label=True).astype(np.int64)[:, :, None], np.eye(4)
    raw = _nifti_voxels(img, path, as_float=False).reshape(_as_3d(img.shape, path))
    if not np.issubdtype(raw.dtype, np.integer):
        if not np.all(np.isfinite(raw)):
            count = int(raw.size - np.count_nonzero(np.isfinite(raw)))
            raise VolumeReadError(f"{path}: label map holds {count} NaN or infinite values, expected "
                                  "whole-number label values")
        rounded = np.rint(raw)
        if not np.array_equal(rounded, raw):
            raise VolumeReadError(f"{path}: label map holds non-integer values, expected whole-number label values")
        raw = rounded
    return raw.astype(np.int64), np.asarray(img.affine, dtype=np.float64)
