"""Predictions as DICOM SEG: a label map written as a Segmentation object of its source series.

A hospital's PACS and viewers (OHIF, 3D Slicer, Horos) show a DICOM SEG over the CT or MR it
was drawn on, with one named, coloured segment per structure; a NIfTI file beside a DICOM
series is neither stored nor shown there. ``run inference --output_format dicom_seg`` (see
``inference/writer.py``) therefore writes each prediction of a DICOM series input as a SEG that
references that series. highdicom builds the object (its checks of the IOD are the reference
implementation's); this module only lays the label map out for it and checks the geometry.

Conventions:

- the label map is in the layout MONAI's ``PydicomReader`` gives the series folder, and so every
  prediction of ``run inference``: ``[X, Y, Z]`` = (columns, rows, slices), integer class
  indices, 0 background; it is transposed to DICOM's [rows, columns] per frame;
- each z index is matched to its source instance by geometry, never by file name: every
  instance's ImagePositionPatient projected on the slice normal must fall on one z index of the
  volume's affine (within a quarter of the slice spacing), one instance per index, and the
  volume's x and y axes must run along the series' rows and columns (the reader's layout, no
  flips); anything else is an error naming the series folder;
- one segment per declared foreground class, present in this volume or not, numbered as the
  class index (segment ``i`` is class ``i``), labelled with the class name: every SEG of a model
  then has the same segments, and a reader needs no table to map them back. BINARY encoding;
  frames of a segment that are empty on a slice are left out, as highdicom does by default;
- algorithm identification: ``medsaga`` (family Artificial Intelligence, the package's version),
  with the bundle or model name, when given, as the ``model`` parameter and the manufacturer's
  model name;
- written atomically (``io.atomic.atomic_path``): a reader never sees half a SEG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from medsaga_components.data.dicom_series import LPS_TO_RAS, SeriesInfo, check_series
from medsaga_components.io.atomic import atomic_path

ON_SLICE_TOLERANCE = 0.25  # of the slice spacing: how far an instance may sit from its z index
AXIS_TOLERANCE = 1e-3  # cosine: the volume's x/y axes along the series' rows/columns
# SNOMED CT "Anatomical structure" for both the category and the type of a segment: the class
# names are the user's and carry no code; the segment label says what the segment is.
ANATOMICAL_STRUCTURE = ("91723000", "SCT", "Anatomical Structure")
SERIES_NUMBER_OFFSET = 1000  # the SEG's series number: the source's plus this


class DicomSegError(ValueError):
    """A label map cannot be written as, or read back from, a DICOM SEG of a series."""


def foreground_class_names(class_names: Sequence[str] | Mapping) -> list[str]:
    """Names of classes 1..C-1, in order, from ``class_names``.

    ``class_names`` is either a sequence indexed by class (index 0 the background, whose name is
    not used) or a mapping ``{name: value}`` of the foreground classes, as
    ``inference.model.served_labels`` (a bundle's ``@labels``) gives it; the values must be
    1..C-1, each once.
    """
    if isinstance(class_names, Mapping):
        try:
            pairs = sorted((int(value), str(name)) for name, value in class_names.items() if int(value) != 0)
        except (TypeError, ValueError) as exc:
            raise DicomSegError(f"class names {dict(class_names)}: expected {{name: class value}} ({exc})") from exc
        if [value for value, _ in pairs] != list(range(1, len(pairs) + 1)):
            raise DicomSegError(f"class names {dict(class_names)}: expected the values 1..N, each once, one per "
                                "foreground class")
        names = [name for _, name in pairs]
    elif isinstance(class_names, str):
        raise DicomSegError(f"class names {class_names!r}: expected a list of names (index 0 the background)")
    else:
        names = [str(name) for name in list(class_names)[1:]]
    if not names:
        raise DicomSegError(f"class names {class_names!r}: no foreground class to write a segment for")
    return names


def _highdicom():
    """highdicom, usable with NumPy 2: highdicom 0.22 (the last release for pydicom 2, which
    MONAI Label's DICOMweb stack needs) still names ``np.float_``, NumPy 1's alias of
    ``np.float64`` that NumPy 2 removed; the alias is put back (later highdicom releases simply
    write ``np.float64``)."""
    import highdicom

    if not hasattr(np, "float_"):
        np.float_ = np.float64
    return highdicom


def _read_headers(info: SeriesInfo) -> list:
    import pydicom

    return [pydicom.dcmread(str(path), stop_before_pixels=True) for path in info.files]


def instance_per_slice(info: SeriesInfo, headers: Sequence, affine: np.ndarray) -> list[int]:
    """For each z index of a volume with RAS ``affine`` [4, 4], the index (into ``info.files``)
    of the source instance at that slice, found by each instance's position on the slice normal.

    Raises ``DicomSegError`` naming the folder when the volume's axes are not the series' rows,
    columns and slices (in the reader's layout), or when the instances do not fall one on each
    z index.
    """
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=float)[:3]  # the same matrix back in LPS
    orientation = np.asarray(headers[0].ImageOrientationPatient, dtype=float)
    for axis, cosine, along in ((0, orientation[:3], "rows"), (1, orientation[3:], "columns")):
        direction = lps[:, axis] / np.linalg.norm(lps[:, axis])
        if float(np.dot(direction, cosine)) < 1.0 - AXIS_TOLERANCE:
            raise DicomSegError(f"{info.folder}: the label map's axis {axis} runs along {direction.round(4).tolist()} "
                                f"(LPS), the series' {along} along {cosine.round(4).tolist()}; expected the layout "
                                "PydicomReader reads the series in, [X, Y, Z] = (columns, rows, slices)")
    normal = np.cross(orientation[:3], orientation[3:])
    step = float(np.dot(lps[:, 2], normal))
    if info.num_slices > 1 and abs(step) < 1e-6:
        raise DicomSegError(f"{info.folder}: the label map's affine has no extent along the slice normal")
    start = float(np.dot(lps[:, 3], normal))
    index_of = [(float(position) - start) / (step if info.num_slices > 1 else 1.0) for position in info.positions]
    slices: list[int | None] = [None] * info.num_slices
    for instance, index in enumerate(index_of):
        z = int(round(index))
        if abs(index - z) > ON_SLICE_TOLERANCE or not 0 <= z < info.num_slices or slices[z] is not None:
            raise DicomSegError(f"{info.files[instance]}: at {info.positions[instance]:.2f} mm on the slice normal, "
                                f"z index {index:.2f} of the label map's affine; expected each instance of "
                                f"{info.folder} on its own z index 0..{info.num_slices - 1}")
        slices[z] = instance
    return [int(s) for s in slices]


def _label_volume(label_map, info: SeriesInfo, headers: Sequence, out_path: Path) -> np.ndarray:
    """The label map as non-negative integers [X, Y, Z], checked against the series' size."""
    array = np.asarray(label_map)
    if array.ndim == 2:
        array = array[:, :, None]  # a single-slice series reads as [X, Y]
    expected = (int(headers[0].Columns), int(headers[0].Rows), info.num_slices)
    if array.shape != expected:
        raise DicomSegError(f"{out_path}: label map of shape {tuple(array.shape)} for series {info.folder} of "
                            f"{expected[1]} rows x {expected[0]} columns x {expected[2]} slices; expected [X, Y, Z] = "
                            f"{expected}, the layout PydicomReader reads the series in")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise DicomSegError(f"{out_path}: label map of {array.dtype} values that are not whole class indices")
    if array.size and array.min() < 0:
        raise DicomSegError(f"{out_path}: label map holds negative values; expected class indices 0..C-1")
    return array.astype(np.uint16 if array.size and array.max() > 255 else np.uint8)


def _algorithm(model_name: str | None):
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    from medsaga_components import __version__

    return hd.AlgorithmIdentificationSequence(name="medsaga", family=codes.cid7162.ArtificialIntelligence,
                                              version=__version__,
                                              parameters={"model": str(model_name)} if model_name else None)


def write_dicom_seg(label_map: np.ndarray, source_series: str | Path, class_names: Sequence[str] | Mapping,
                    out_path: str | Path, *, affine: np.ndarray | None = None, model_name: str | None = None) -> Path:
    """Write ``label_map`` [X, Y, Z] (class indices) as a DICOM SEG of the series in ``source_series``.

    ``class_names``: see ``foreground_class_names`` (a list with the background at index 0, or
    ``{name: value}``); one segment per foreground class, segment number = class index.
    ``affine``: the label map's RAS affine [4, 4] (a prediction's ``meta["affine"]``); by default
    the one ``PydicomReader`` gives the series (``SeriesInfo.affine``). The z indices are matched to the source
    instances through it (module docstring). ``model_name`` (a bundle's name) is recorded in the
    algorithm identification. The folder must hold the one series only
    (``data.dicom_series.check_series``), so write the SEG elsewhere. Returns ``out_path``.
    """
    hd = _highdicom()
    from pydicom.sr.coding import Code

    from medsaga_components import __version__

    out_path = Path(out_path)
    info = check_series(source_series)
    headers = _read_headers(info)
    labels = _label_volume(label_map, info, headers, out_path)
    names = foreground_class_names(class_names)
    if labels.max(initial=0) > len(names):
        extra = sorted(int(v) for v in np.unique(labels) if v > len(names))
        raise DicomSegError(f"{out_path}: label map holds class indices {extra}, but only {len(names)} foreground "
                            f"classes are named ({names})")
    if affine is None:
        affine = info.affine
    order = instance_per_slice(info, headers, affine)
    algorithm = _algorithm(model_name)
    structure = Code(*ANATOMICAL_STRUCTURE)
    segments = [hd.seg.SegmentDescription(segment_number=number, segment_label=name,
                                          segmented_property_category=structure,
                                          segmented_property_type=structure,
                                          algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                          algorithm_identification=algorithm, tracking_id=name,
                                          tracking_uid=hd.UID())
                for number, name in enumerate(names, start=1)]
    source_images = [headers[instance] for instance in order]  # z index k -> its instance
    frames = np.ascontiguousarray(labels.transpose(2, 1, 0))  # [X, Y, Z] -> [Z, rows, columns]
    series_number = int(getattr(headers[0], "SeriesNumber", 0) or 0) + SERIES_NUMBER_OFFSET
    try:
        seg = hd.seg.Segmentation(
            source_images=source_images, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=series_number,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medsaga",
            manufacturer_model_name=str(model_name or "medsaga"), software_versions=f"medsaga {__version__}",
            device_serial_number="none", series_description=f"medsaga {model_name or ''}".strip()[:64],
            content_description="segmentation by medsaga")
    except (ValueError, TypeError, AttributeError) as exc:
        raise DicomSegError(f"{out_path}: DICOM SEG of {info.folder} cannot be built ({exc})") from exc
    with atomic_path(out_path) as tmp:
        seg.save_as(str(tmp))
    return out_path


def read_dicom_seg(seg_path: str | Path, source_series: str | Path) -> np.ndarray:
    """The label map [X, Y, Z] (uint, segment number = class index) of a SEG of ``source_series``,
    in the layout ``PydicomReader`` gives the series; slices the SEG leaves out are background."""
    hd = _highdicom()

    seg_path = Path(seg_path)
    info = check_series(source_series)
    headers = _read_headers(info)
    try:
        seg = hd.seg.segread(str(seg_path))
    except Exception as exc:  # pydicom and highdicom raise many types for a file that is not a SEG
        raise DicomSegError(f"{seg_path}: cannot be read as a DICOM SEG ({type(exc).__name__}: {exc})") from exc
    referenced = {str(item.SeriesInstanceUID) for item in getattr(seg, "ReferencedSeriesSequence", [])}
    if info.series_uid not in referenced:
        raise DicomSegError(f"{seg_path}: references series {sorted(referenced)}, not {info.series_uid} of "
                            f"{info.folder}")
    order = instance_per_slice(info, headers, info.affine)
    uids = [info.sop_instance_uids[instance] for instance in order]
    frames = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    return np.ascontiguousarray(np.asarray(frames).transpose(2, 1, 0))  # [Z, rows, columns] -> [X, Y, Z]
