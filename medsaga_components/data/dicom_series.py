"""DICOM image series: one folder holds one series, checked before MONAI reads it.

Wherever medsaga accepts a NIfTI volume it accepts a folder of DICOM files (a ``dataset.json``
``image``, ``run inference --dataset_dir``, MONAI Label, the CLI). The voxels are read the way
MONAI reads a series: ``LoadImage`` with its ``PydicomReader`` (pydicom is a few hundred kB
and pure Python; ITK would add 100+ MB for the same array). The result is laid out like a
NIfTI volume: ``[X, Y, Z]`` = (columns, rows, slices) with an RAS affine, so slicing along
axis 2 gives the acquired (e.g. axial) slices.

MONAI's reader stacks whatever the folder holds in ``InstanceNumber`` order and takes the
slice spacing as the mean distance between neighbours, so a folder with a slice missing, two
series mixed, or slices out of order is read without complaint into a distorted volume.
``check_series`` refuses those with an error naming the folder and the files involved:

- files that are not DICOM, or DICOM objects of more than one series (an RTSTRUCT kept beside
  its CT counts: store it outside the series folder);
- slices of different size, pixel spacing or orientation;
- two slices at one position, slice positions that do not follow the instance numbers;
- a gap of about a whole number of spacings (missing slices), or uneven spacing otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsaga_components.data.errors import VolumeReadError

# Positions written by scanners are rounded (0.01 mm and coarser); gaps within this much of the
# series' step (1 % of the step, at least 0.05 mm) count as even.
SPACING_TOLERANCE_FRACTION = 0.01
SPACING_TOLERANCE_MM = 0.05
ORIENTATION_TOLERANCE = 1e-4
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # DICOM patient coordinates -> NIfTI/MONAI world


def is_dicom_series(path: str | Path) -> bool:
    """A folder given as an image is read as a DICOM series."""
    return Path(path).is_dir()


@dataclass(frozen=True)
class SeriesInfo:
    """One checked series; ``files`` and ``positions`` in the reader's (``InstanceNumber``) order."""

    folder: Path
    series_uid: str
    frame_of_reference_uid: str | None
    modality: str
    files: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    positions: tuple[float, ...]  # ImagePositionPatient projected on the slice normal, mm
    shape: tuple[int, int, int]  # [X, Y, Z] = (columns, rows, slices), as PydicomReader reads it
    affine: np.ndarray  # RAS [4, 4] of that array, as PydicomReader builds it (header_affine)

    @property
    def num_slices(self) -> int:
        return len(self.files)


def _read_headers(folder: Path) -> list[tuple[Path, object]]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise VolumeReadError(f"{folder}: DICOM series folder holds no files")
    headers = []
    for path in files:
        try:
            headers.append((path, pydicom.dcmread(str(path), stop_before_pixels=True)))
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise VolumeReadError(f"{path}: in DICOM series folder {folder}, cannot be read as DICOM ({exc}); "
                                  "expected a folder holding only the files of one DICOM series") from exc
    return headers


def _require(ds, keyword: str, path: Path):
    value = getattr(ds, keyword, None)
    if value is None or value == "":
        raise VolumeReadError(f"{path}: DICOM attribute {keyword} is missing; expected an image slice with "
                              "geometry (ImagePositionPatient, ImageOrientationPatient, PixelSpacing, Rows, Columns)")
    return value


def _describe_series(groups: dict[str, list[tuple[Path, object]]]) -> str:
    return "; ".join(f"{uid} ({getattr(items[0][1], 'Modality', '?')}, {len(items)} file(s), e.g. {items[0][0].name})"
                     for uid, items in groups.items())


def check_series(folder: str | Path) -> SeriesInfo:
    """Read the headers of every file in ``folder`` and check that they form one complete,
    evenly spaced image series (see the module docstring); raises ``VolumeReadError``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeReadError(f"{folder}: not a folder; a DICOM series is given as the folder of its files")
    headers = _read_headers(folder)
    groups: dict[str, list[tuple[Path, object]]] = {}
    for path, ds in headers:
        groups.setdefault(str(getattr(ds, "SeriesInstanceUID", "(no SeriesInstanceUID)")), []).append((path, ds))
    if len(groups) > 1:
        raise VolumeReadError(f"{folder}: holds {len(groups)} DICOM series: {_describe_series(groups)}; expected one "
                              "image series per folder (put each series, and any RTSTRUCT or SEG, in its own place)")
    (series_uid, items), = groups.items()
    first_path, first = items[0]
    orientation = np.asarray(_require(first, "ImageOrientationPatient", first_path), dtype=float)
    size = (int(_require(first, "Rows", first_path)), int(_require(first, "Columns", first_path)))
    spacing = np.asarray(_require(first, "PixelSpacing", first_path), dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    rows = []
    for path, ds in items:
        own_orientation = np.asarray(_require(ds, "ImageOrientationPatient", path), dtype=float)
        if not np.allclose(own_orientation, orientation, atol=ORIENTATION_TOLERANCE):
            raise VolumeReadError(f"{path}: orientation {own_orientation.tolist()} differs from {first_path.name}'s "
                                  f"{orientation.tolist()}; expected one orientation per series in {folder}")
        own_size = (int(_require(ds, "Rows", path)), int(_require(ds, "Columns", path)))
        if own_size != size:
            raise VolumeReadError(f"{path}: {own_size[0]} x {own_size[1]} pixels, {first_path.name} has "
                                  f"{size[0]} x {size[1]}; expected one slice size per series in {folder}")
        if not np.allclose(np.asarray(_require(ds, "PixelSpacing", path), dtype=float), spacing, rtol=1e-4):
            raise VolumeReadError(f"{path}: pixel spacing {list(ds.PixelSpacing)} differs from {first_path.name}'s "
                                  f"{spacing.tolist()}; expected one pixel spacing per series in {folder}")
        position = float(np.dot(np.asarray(_require(ds, "ImagePositionPatient", path), dtype=float), normal))
        rows.append((int(getattr(ds, "InstanceNumber", 0) or 0), position, path, str(ds.SOPInstanceUID), ds))
    rows.sort(key=lambda r: r[0])  # MONAI's PydicomReader stacks slices by InstanceNumber
    numbers = [r[0] for r in rows]
    if len(set(numbers)) != len(numbers):
        dup = next(n for n in numbers if numbers.count(n) > 1)
        files = [r[2].name for r in rows if r[0] == dup]
        raise VolumeReadError(f"{folder}: files {files} share InstanceNumber {dup}; expected one number per slice "
                              "(the order slices are stacked in)")
    positions = np.asarray([r[1] for r in rows])
    _check_positions(folder, positions, [r[2] for r in rows])
    return SeriesInfo(folder=folder, series_uid=series_uid,
                      frame_of_reference_uid=getattr(first, "FrameOfReferenceUID", None),
                      modality=str(getattr(first, "Modality", "")), files=tuple(r[2] for r in rows),
                      sop_instance_uids=tuple(r[3] for r in rows), positions=tuple(positions.tolist()),
                      shape=(size[1], size[0], len(rows)), affine=header_affine(rows[0][4], rows[-1][4], len(rows)))


def header_affine(first, last, num_slices: int) -> np.ndarray:
    """RAS affine [4, 4] of the series' ``[X, Y, Z]`` array as ``PydicomReader`` builds it, from the
    headers of its first and last instance (by InstanceNumber): origin at the first, x along its
    rows (column spacing), y along its columns (row spacing), z from the first to the last
    instance (a single slice: the unit z axis, as the reader gives it)."""
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0] = orientation[:3] * column_spacing
    affine[:3, 1] = orientation[3:] * row_spacing
    origin = np.asarray(first.ImagePositionPatient, dtype=float)
    if num_slices > 1:
        affine[:3, 2] = (np.asarray(last.ImagePositionPatient, dtype=float) - origin) / (num_slices - 1)
    affine[:3, 3] = origin
    affine[:3] = LPS_TO_RAS @ affine[:3]
    if num_slices == 1:
        affine[:3, 2] = (0.0, 0.0, 1.0)
    return affine


def _check_positions(folder: Path, positions: np.ndarray, files: list[Path]) -> None:
    """Slices in instance order must sit at strictly monotonic, evenly spaced positions."""
    if len(positions) < 2:
        return
    gaps = np.diff(positions)
    same = np.flatnonzero(np.abs(gaps) < 1e-3)
    if same.size:
        i = int(same[0])
        raise VolumeReadError(f"{folder}: {files[i].name} and {files[i + 1].name} lie at the same slice position "
                              f"{positions[i]:.2f} mm; expected one slice per position (a duplicate or a second series?)")
    if not (np.all(gaps > 0) or np.all(gaps < 0)):
        i = int(np.flatnonzero(np.sign(gaps) != np.sign(np.median(gaps)))[0])
        raise VolumeReadError(f"{folder}: slice positions do not follow the instance numbers ({files[i].name} at "
                              f"{positions[i]:.2f} mm, {files[i + 1].name} at {positions[i + 1]:.2f} mm); expected "
                              "InstanceNumber to run along the slice positions")
    gaps = np.abs(gaps)
    step = float(np.median(gaps))
    tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_FRACTION * step)
    for i in np.flatnonzero(np.abs(gaps - step) > tolerance):
        i = int(i)
        multiple = gaps[i] / step
        where = (f"between {files[i].name} ({positions[i]:.2f} mm) and {files[i + 1].name} "
                 f"({positions[i + 1]:.2f} mm)")
        if round(multiple) >= 2 and abs(gaps[i] - round(multiple) * step) <= tolerance * round(multiple):
            raise VolumeReadError(f"{folder}: {int(round(multiple)) - 1} slice(s) missing {where}: the gap is "
                                  f"{gaps[i]:.2f} mm, the series' spacing {step:.2f} mm; expected a complete series")
        raise VolumeReadError(f"{folder}: uneven slice spacing: {gaps[i]:.2f} mm {where}, {step:.2f} mm elsewhere; "
                              "expected evenly spaced slices (resample the series first)")


def series_file_stem(relative: str | Path) -> str:
    """A series folder's name for the files made from it: its path relative to the dataset, joined
    by ``_`` (``pat_1/CT`` -> ``pat_1_CT``), since series folders are often named alike."""
    return "_".join(p for p in Path(relative).parts if p not in (".", "..", Path(relative).anchor))


def read_dicom_series(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Checked series -> (float32 array [X, Y, Z] in the series' units, e.g. HU; RAS affine [4, 4])."""
    from monai.data import PydicomReader
    from monai.transforms import LoadImage

    check_series(folder)
    try:
        image = LoadImage(image_only=True, reader=PydicomReader())(str(folder))
    except Exception as exc:  # pydicom raises many types for undecodable pixel data
        raise VolumeReadError(f"{folder}: DICOM pixel data cannot be read ({type(exc).__name__}: {exc})") from exc
    array = np.asarray(image.detach().cpu().numpy(), dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    return array, np.asarray(image.affine.detach().cpu().numpy(), dtype=np.float64)
