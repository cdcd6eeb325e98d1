"""RTSTRUCT labels: radiotherapy contours rasterised onto the DICOM series they were drawn on.

A ``dataset.json`` ``label`` may be an RTSTRUCT file when its ``image`` is a DICOM series
folder. Its ROIs become label values by name: an ROI named like a class of ``labels`` (case
and surrounding spaces ignored) takes that class's value; ``dataset.json``'s ``roi_names``
maps other names explicitly (``{"GTV-1": "tumour"}``), or to ``null`` to leave an ROI out
(a body outline, a couch). Any other ROI is an error naming it: a silently dropped structure
would train the model to call it background.

Reading uses pydicom (the RTSTRUCT is a plain DICOM object); rasterising uses Pillow's polygon
fill, already a dependency. rt-utils does the same with OpenCV, whose wheel needs system
libraries (libGL) that a bare server lacks, and it silently clips contours outside the image;
highdicom reads and writes SEG but does not rasterise RTSTRUCT contours.

Conventions:

- contour points (patient LPS, mm) go through the series' affine (MONAI's ``PydicomReader``,
  RAS) to voxel indices, so the label map has exactly the image's ``[X, Y, Z]`` grid;
- a ``CLOSED_PLANAR`` contour must lie on one slice (within a quarter of the slice spacing) and
  inside the image (within half a voxel of its edge): otherwise an error names the ROI and slice;
- the pixels the polygon covers, its outline included, are filled (as OpenCV's ``fillPoly``,
  which rt-utils uses, does); several contours of one ROI on one slice combine by exclusive or,
  so an inner contour cuts a hole;
- ``POINT`` and ``OPEN_PLANAR`` contours enclose no area and are skipped; where two ROIs
  overlap, the larger label value wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image, ImageDraw

from medsaga_components.data.dicom_series import LPS_TO_RAS, check_series
from medsaga_components.data.errors import VolumeReadError

ON_SLICE_TOLERANCE = 0.25  # of the slice spacing
INSIDE_TOLERANCE = 0.5  # voxels beyond the outermost voxel centre


def is_rtstruct(path: str | Path) -> bool:
    """A ``.dcm`` file given as a label is read as an RTSTRUCT."""
    return str(path).lower().endswith(".dcm")


def roi_key(name: str) -> str:
    return " ".join(str(name).split()).casefold()


def _read(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not path.is_file():
        raise VolumeReadError(f"file not found: {path}")
    try:
        ds = pydicom.dcmread(str(path))
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise VolumeReadError(f"{path}: cannot be read as DICOM ({exc}); expected an RTSTRUCT file") from exc
    if getattr(ds, "Modality", None) != "RTSTRUCT":
        raise VolumeReadError(f"{path}: DICOM Modality {getattr(ds, 'Modality', None)!r}, expected an RTSTRUCT "
                              "(a label given as a .dcm file is read as radiotherapy contours)")
    return ds


def referenced_series_uids(ds) -> set[str]:
    """Series UIDs the structure set says its contours were drawn on."""
    uids = set()
    for frame in getattr(ds, "ReferencedFrameOfReferenceSequence", []):
        for study in getattr(frame, "RTReferencedStudySequence", []):
            for series in getattr(study, "RTReferencedSeriesSequence", []):
                uids.add(str(series.SeriesInstanceUID))
    return uids


def _match_rois(path: Path, names: dict[int, str], roi_labels: Mapping[str, int | None]) -> dict[int, int]:
    """``{ROINumber: label value}``; ROIs mapped to None are left out, unmatched ones refused."""
    lookup = {roi_key(k): v for k, v in roi_labels.items()}
    matched, unmatched = {}, []
    for number, name in names.items():
        key = roi_key(name)
        if key not in lookup:
            unmatched.append(name)
        elif lookup[key] is not None:
            matched[number] = int(lookup[key])
    if unmatched:
        known = sorted({k for k, v in roi_labels.items() if v is not None})
        raise VolumeReadError(
            f"{path}: ROI name(s) {unmatched} match no label (labels: {known}); name the class in dataset.json "
            f"'labels', map it with \"roi_names\": {{\"{unmatched[0]}\": \"<label name>\"}}, or leave it out with "
            f"\"roi_names\": {{\"{unmatched[0]}\": null}}")
    return matched


def _fill(polygon_xy: np.ndarray, shape_xy: tuple[int, int]) -> np.ndarray:
    """Pixels [X, Y] covered by a polygon given in voxel indices (x, y), outline included."""
    canvas = Image.new("1", shape_xy)  # width X, height Y: Pillow's (x, y) is our (i, j)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in polygon_xy.tolist()], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool).T


def read_rtstruct(path: str | Path, series_folder: str | Path,
                  roi_labels: Mapping[str, int | None]) -> tuple[np.ndarray, np.ndarray]:
    """RTSTRUCT ``path`` -> (int64 label map [X, Y, Z], affine [4, 4]) on the grid of
    ``series_folder``'s image (``dicom_series.read_dicom_series``'s grid, from the headers).

    ``roi_labels`` maps ROI names to label values (None: left out). Raises ``VolumeReadError``
    naming the file for a structure set drawn on another series, a contour off its slice or
    outside the image, and ROI names that match no label.
    """
    path = Path(path)
    ds = _read(path)
    series = check_series(series_folder)
    referenced = referenced_series_uids(ds)
    if referenced and series.series_uid not in referenced:
        raise VolumeReadError(f"{path}: contours reference series {sorted(referenced)}, but the image "
                              f"{series.folder} is series {series.series_uid}; expected the RTSTRUCT of that series")
    own_frame = getattr(ds, "ReferencedFrameOfReferenceSequence", [None])[0]
    frame_uid = getattr(own_frame, "FrameOfReferenceUID", None)
    if not referenced and frame_uid and series.frame_of_reference_uid and frame_uid != series.frame_of_reference_uid:
        raise VolumeReadError(f"{path}: frame of reference {frame_uid} differs from the image {series.folder}'s "
                              f"{series.frame_of_reference_uid}; expected the RTSTRUCT of that series")
    names = {int(roi.ROINumber): str(roi.ROIName) for roi in getattr(ds, "StructureSetROISequence", [])}
    values = _match_rois(path, names, roi_labels)
    shape, affine = series.shape, series.affine
    world_to_voxel = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    labels = np.zeros(shape, dtype=np.int64)
    contours_by_roi = {int(c.ReferencedROINumber): c for c in getattr(ds, "ROIContourSequence", [])}
    for number, value in sorted(values.items(), key=lambda item: item[1]):
        roi = contours_by_roi.get(number)
        if roi is None:
            continue
        mask = np.zeros(shape, dtype=bool)
        for index, contour in enumerate(getattr(roi, "ContourSequence", [])):
            if str(getattr(contour, "ContourGeometricType", "CLOSED_PLANAR")) != "CLOSED_PLANAR":
                continue
            where = f"ROI {names[number]!r} contour {index}"
            lps = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            voxels = (world_to_voxel @ np.c_[lps @ LPS_TO_RAS.T, np.ones(len(lps))].T).T[:, :3]
            k = float(np.mean(voxels[:, 2]))
            if np.max(np.abs(voxels[:, 2] - round(k))) > ON_SLICE_TOLERANCE:
                raise VolumeReadError(f"{path}: {where} lies between slices (slice index {k:.2f}); expected "
                                      f"contours on the slices of {series.folder}")
            low, high = voxels.min(axis=0), voxels.max(axis=0)
            limit = np.asarray(shape, dtype=float) - 1 + INSIDE_TOLERANCE
            if np.any(low < -INSIDE_TOLERANCE) or np.any(high > limit):
                raise VolumeReadError(
                    f"{path}: {where} lies outside the image {series.folder} (voxel range "
                    f"{np.round(low, 1).tolist()} .. {np.round(high, 1).tolist()}, image shape {list(shape)}); "
                    "expected contours inside the image they were drawn on")
            mask[:, :, int(round(k))] ^= _fill(voxels[:, :2], shape[:2])
        labels[mask] = value
    return labels, affine
