"""MONAI dictionary transforms that apply the data pipeline's conventions to whole volumes."""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from medsaga_components.data.intensity import scale_intensity


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
