"""Prediction files written atomically: MONAI's NIfTI writer behind a temporary name, and DICOM SEG.

``run inference`` writes its label maps with MONAI's ``SaveImaged``, whose writer saves straight
onto the final name: a run stopped mid-file leaves a truncated ``*_seg.nii.gz`` that a pipeline
then reads as a result. ``AtomicNibabelWriter`` writes to a temporary file beside the target and
renames it (``io.atomic.atomic_path``: normal permissions, errors naming the target).

``register_atomic_nifti_writer`` puts it first in MONAI's writer table for ``.nii``/``.nii.gz``,
so every ``SaveImage(d)`` created afterwards uses it with no change to the bundle configs; the
bundles' configs import ``medsaga_components.engine``, which registers it.

``prediction_saver`` is the ``SaveImaged`` of the bundles' ``inference.json`` for their
``output_format`` key: ``"nifti"`` (the default, ``<volume>_seg.nii.gz``) or ``"dicom_seg"``
(``<series folder>_seg.dcm``, a DICOM SEG referencing the input series, one segment per class:
``inference.dicom_seg``), written by ``DicomSegWriter``, a MONAI ``ImageWriter`` that any
``SaveImage(d)`` can be given. DICOM SEG needs a DICOM series input; ``PredictionLayout`` refuses
anything else before the writer runs (``SaveImage`` reports a writer's own errors as "cannot
find a suitable writer", with the real error in the text below).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from monai.data import FolderLayout, ImageWriter, NibabelWriter, register_writer
from monai.data.image_writer import SUPPORTED_WRITERS
from monai.config import PathLike
from monai.transforms import SaveImaged

from medsaga_components.data.dicom_series import is_dicom_series, series_file_stem
from medsaga_components.io.atomic import atomic_path
from medsaga_components.inference.dicom_seg import foreground_class_names, write_dicom_seg

logger = logging.getLogger(__name__)

NIFTI_EXTENSIONS = ("nii", "nii.gz")
OUTPUT_FORMATS = ("nifti", "dicom_seg")
OUTPUT_POSTFIX = "seg"


class AtomicNibabelWriter(NibabelWriter):
    """``NibabelWriter`` whose ``write`` never leaves a partial file under the final name."""

    def write(self, filename: PathLike, verbose: bool = False, **obj_kwargs) -> None:
        with atomic_path(filename) as tmp:  # keeps the .nii.gz suffix nibabel reads the format from
            super().write(tmp, verbose=False, **obj_kwargs)
        if verbose:
            logger.info("writing: %s", filename)


def register_atomic_nifti_writer() -> None:
    """Make ``AtomicNibabelWriter`` MONAI's first choice for NIfTI files (idempotent)."""
    for extension in NIFTI_EXTENSIONS:
        if SUPPORTED_WRITERS.get(extension, ())[:1] != (AtomicNibabelWriter,):
            register_writer(extension, AtomicNibabelWriter)


class DicomSegWriter(ImageWriter):
    """A label map [C=1, X, Y, Z] and its metadata (``affine``; ``filename_or_obj``: the source
    DICOM series folder) written as a DICOM SEG by ``inference.dicom_seg.write_dicom_seg``.

    ``class_names`` (a list with the background at index 0, or ``{name: value}`` as a bundle's
    ``@labels``) and ``model_name`` come through ``SaveImage``'s ``init_kwargs``
    (``SaveImaged(..., writer=DicomSegWriter).set_options(init_kwargs={"class_names": ...})``).
    It never resamples: the SEG is on the source series' grid, which the label map must have.
    """

    def __init__(self, output_dtype=np.uint8, class_names: Sequence[str] | Mapping = (),
                 model_name: str | None = None, **kwargs) -> None:
        super().__init__(output_dtype=output_dtype, class_names=class_names, model_name=model_name,
                         affine=None, source_series=None, **kwargs)

    def set_data_array(self, data_array, channel_dim: int | None = 0, squeeze_end_dims: bool = True, **kwargs):
        self.data_obj = self.convert_to_channel_last(data=data_array, channel_dim=channel_dim,
                                                     squeeze_end_dims=squeeze_end_dims,
                                                     spatial_ndim=kwargs.pop("spatial_ndim", 3))

    def set_metadata(self, meta_dict: Mapping | None, resample: bool = False, **options):
        meta = meta_dict or {}
        self.source_series = meta.get("filename_or_obj")
        self.affine = meta.get("affine")
        if self.source_series is None:
            raise ValueError("DICOM SEG output: the prediction's metadata names no source series (filename_or_obj)")

    def write(self, filename: PathLike, verbose: bool = False, **kwargs) -> None:
        array = np.asarray(self.create_backend_obj(self.data_obj))
        affine = None if self.affine is None else np.asarray(self.create_backend_obj(self.affine), dtype=float)
        write_dicom_seg(array, self.source_series, self.class_names, filename, affine=affine,
                        model_name=self.model_name)
        if verbose:
            logger.info("writing: %s", filename)


class PredictionLayout(FolderLayout):
    """MONAI's flat ``FolderLayout`` (``<output_dir>/<input name>_<postfix><ext>``), except that a
    DICOM series input is named by ``series_output_name``: series folders are often named alike
    (``pat_1/CT``, ``pat_2/CT``) and MONAI's layout would also cut a folder name at its last dot
    (``1.2.840`` -> ``1.2``). ``require_series``: refuse any other input, with an error naming it
    (DICOM SEG needs a source series)."""

    def __init__(self, output_dir: PathLike, extension: str, postfix: str = OUTPUT_POSTFIX,
                 data_root_dir: PathLike = "", require_series: bool = False) -> None:
        super().__init__(output_dir, postfix=postfix, extension=extension)
        self.series_root = data_root_dir
        self.require_series = require_series

    def filename(self, subject: PathLike = "subject", idx=None, **kwargs) -> PathLike:
        source = Path(str(subject))
        if is_dicom_series(source):
            return Path(self.output_dir) / f"{series_output_name(source, self.series_root)}_{self.postfix}{self.ext}"
        if self.require_series:
            raise ValueError(f"{source}: output_format 'dicom_seg' needs a DICOM series input (a folder of the "
                             "series' .dcm files), and this input is not one; use output_format 'nifti' for it")
        return super().filename(subject, idx, **kwargs)


def series_output_name(source: Path, data_root_dir: PathLike = "") -> str:
    """A series folder's name for its prediction: its path below ``data_root_dir`` (the bundle's
    ``dataset_dir``) as ``dicom_series.series_file_stem`` joins it, else the folder's own name."""
    try:
        relative = source.resolve().relative_to(Path(data_root_dir).resolve()) if data_root_dir else Path()
    except ValueError:
        relative = Path()
    return series_file_stem(relative) or source.name


def prediction_saver(output_dir: PathLike, output_format: str = "nifti",
                     class_names: Sequence[str] | Mapping | None = None, model_name: str | None = None,
                     data_root_dir: PathLike = "") -> SaveImaged:
    """The ``SaveImaged`` (key ``pred``) that writes a bundle's predictions in ``output_format``.

    ``"nifti"``: ``<volume>_seg.nii.gz`` beside nothing else, uint8, the input's geometry
    (``AtomicNibabelWriter``). ``"dicom_seg"``: ``<series folder>_seg.dcm``, a DICOM SEG of the
    input series with one segment per class of ``class_names`` (a list with the background at
    index 0, or ``{name: value}`` as a bundle's ``@labels``), ``model_name`` recorded as the
    algorithm's model. Any other format is an error naming the ``output_format`` key. A DICOM
    series input is named by its path below ``data_root_dir`` (the bundle's ``dataset_dir``):
    ``pat_1/CT`` -> ``pat_1_CT_seg.nii.gz`` or ``pat_1_CT_seg.dcm``.
    """
    if output_format == "nifti":
        register_atomic_nifti_writer()  # SaveImage picks its writer when it is built
        return SaveImaged(keys="pred", output_dir=output_dir, output_postfix=OUTPUT_POSTFIX, output_dtype=np.uint8,
                          resample=False, separate_folder=False, print_log=False,
                          folder_layout=PredictionLayout(output_dir, ".nii.gz", data_root_dir=data_root_dir))
    if output_format == "dicom_seg":
        if class_names is None:
            raise ValueError("output_format 'dicom_seg' needs the class names, one segment label per class")
        foreground_class_names(class_names)  # a bad list fails here, not after the first volume
        saver = SaveImaged(keys="pred", output_dir=output_dir, output_postfix=OUTPUT_POSTFIX, output_ext=".dcm",
                           output_dtype=np.uint8, resample=False, print_log=False, writer=DicomSegWriter,
                           folder_layout=PredictionLayout(output_dir, ".dcm", data_root_dir=data_root_dir,
                                                          require_series=True))
        return saver.set_options(init_kwargs={"class_names": class_names, "model_name": model_name})
    raise ValueError(f"output_format {output_format!r}: expected one of {', '.join(map(repr, OUTPUT_FORMATS))}")
