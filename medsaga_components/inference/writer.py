"""Prediction files written atomically: MONAI's NIfTI writer behind a temporary name.

``run inference`` writes its label maps with MONAI's ``SaveImaged``, whose writer saves straight
onto the final name: a run stopped mid-file leaves a truncated ``*_seg.nii.gz`` that a pipeline
then reads as a result. ``AtomicNibabelWriter`` writes to a temporary file beside the target and
renames it (``io.atomic.atomic_path``: normal permissions, errors naming the target).

``register_atomic_nifti_writer`` puts it first in MONAI's writer table for ``.nii``/``.nii.gz``,
so every ``SaveImage(d)`` created afterwards uses it with no change to the bundle configs; the
bundles' configs import ``medsaga_components.engine``, which registers it.
"""

from __future__ import annotations

import logging

from monai.data import NibabelWriter, register_writer
from monai.data.image_writer import SUPPORTED_WRITERS
from monai.config import PathLike

from medsaga_components.io.atomic import atomic_path

logger = logging.getLogger(__name__)

NIFTI_EXTENSIONS = ("nii", "nii.gz")


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
