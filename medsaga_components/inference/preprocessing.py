"""MONAI dictionary transforms that apply the data pipeline's conventions to whole volumes:
the same volumes refused, the same intensity scaling."""

from __future__ import annotations

from pathlib import Path
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor, PydicomReader
from monai.transforms import LoadImaged, MapTransform
from monai.utils import ensure_tuple

from medsaga_components.data.intensity import scale_intensity
from medsaga_components.data.volume_io import read_image


class DicomSeriesReader(PydicomReader):
    """MONAI's ``PydicomReader`` claiming only folders (DICOM series) and ``.dcm`` files: its
    own suffix check accepts any file, which would send NIfTI files to pydicom."""

    def verify_suffix(self, filename) -> bool:
        return all(Path(name).is_dir() or str(name).lower().endswith(".dcm") for name in ensure_tuple(filename))


class LoadVolumed(LoadImaged):
    """MONAI's ``LoadImaged`` that also reads a folder as a DICOM series, with MONAI's
    ``PydicomReader`` (as training does: ``data.dicom_series``); files still go to the reader
    their suffix selects (NIfTI: nibabel)."""

    def __init__(self, keys: Sequence[Hashable], **kwargs) -> None:
        super().__init__(keys, **kwargs)
        self._loader.register(DicomSeriesReader())  # registered last, asked first


class ScaleIntensityForModalityd(MapTransform):
    """Scale to ``[0, 1]`` exactly as training did: CT windowed, other modalities between the
    volume's 1st and 99th percentiles (``medsaga_components.data.intensity``)."""

    def __init__(self, keys: Sequence[Hashable], modality: str = "MRI", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modality = modality

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            scaled = scale_intensity(np.asarray(value.detach().cpu() if torch.is_tensor(value) else value), self.modality)
            if isinstance(value, MetaTensor):
                # Keep the metadata (affine, file name) so the writer restores the input's geometry.
                d[key] = MetaTensor(torch.from_numpy(scaled), meta=value.meta, applied_operations=value.applied_operations)
            else:
                d[key] = torch.from_numpy(scaled) if torch.is_tensor(value) else scaled
        return d


def check_volume(path: str | Path, nonfinite_fill: float | None = None) -> None:
    """Refuse a volume that training would refuse (``data.volume_io.read_image``: unreadable or
    truncated, not a single-channel 2-D/3-D image, NaN or infinite voxels without a
    ``nonfinite_fill``), with an error that names the file, before any slice of it runs."""
    read_image(path, nonfinite_fill)


def check_volumes(datalist: Sequence[Mapping], key: str = "image", nonfinite_fill: float | None = None) -> None:
    """``check_volume`` on every volume of a datalist, before inference starts (``run inference``)."""
    for item in datalist:
        check_volume(item[key], nonfinite_fill)


class CheckVolumed(MapTransform):
    """``check_volume`` on the files named under ``keys`` (the first preprocessing step, so that
    MONAI Label and ``run inference`` refuse the same volumes as training)."""

    def __init__(self, keys: Sequence[Hashable], nonfinite_fill: float | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.nonfinite_fill = nonfinite_fill

    def __call__(self, data: Mapping) -> dict:
        for key in self.key_iterator(dict(data)):
            if isinstance(data[key], (str, Path)):
                check_volume(data[key], self.nonfinite_fill)
        return dict(data)
