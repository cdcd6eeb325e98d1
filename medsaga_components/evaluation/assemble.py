"""Collect per-slice predictions from batches and regroup them into volumes (slabs).

A ``SliceDataset`` over validation/test ranges yields slices of several volumes in any
batch order; ``VolumeAssembler.add_batch`` files each predicted slice under its volume, and
``volumes()`` restacks them on the original grid. A range that covers only part of a volume
(the ``slices`` hold-out) becomes a slab ``[start, stop)`` along the axis, with its affine
shifted accordingly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medsaga_components.evaluation.restack import restack_volume


@dataclass(frozen=True)
class AssembledVolume:
    volume: str  # image path as in dataset.json
    image_path: str
    axis: int
    slice_start: int
    slice_stop: int
    prediction: np.ndarray  # int64 class indices, the volume's shape except (stop - start) along axis


class VolumeAssembler:
    def __init__(self) -> None:
        # volume -> {slice index -> [S, S] class map}, plus per-volume metadata
        self._slices: dict[str, dict[int, np.ndarray]] = {}
        self._meta: dict[str, dict] = {}

    def add_batch(self, predictions: torch.Tensor | np.ndarray, batch: dict) -> None:
        """predictions: [B, S, S] or [B, 1, S, S] class indices; batch: the collated samples' metadata."""
        predictions = predictions.detach().cpu().numpy() if isinstance(predictions, torch.Tensor) else np.asarray(predictions)
        if predictions.ndim == 4 and predictions.shape[1] == 1:
            predictions = predictions[:, 0]
        for b in range(predictions.shape[0]):
            volume = batch["volume"][b]
            geometry = [int(v) for v in batch["geometry"][b]]
            meta = self._meta.setdefault(volume, {
                "image_path": batch["image_path"][b],
                "axis": int(batch["axis"][b]),
                "geometry": geometry,
                "volume_shape": [int(v) for v in batch["volume_shape"][b]],
            })
            if meta["geometry"] != geometry or meta["axis"] != int(batch["axis"][b]):
                raise ValueError(f"{volume}: slices disagree on axis/geometry ({meta['geometry']} vs {geometry})")
            self._slices.setdefault(volume, {})[int(batch["slice_index"][b])] = predictions[b]

    def volumes(self) -> list[AssembledVolume]:
        out = []
        for volume, slices in self._slices.items():
            meta = self._meta[volume]
            indices = sorted(slices)
            start, stop = indices[0], indices[-1] + 1
            if len(indices) != stop - start:
                missing = sorted(set(range(start, stop)) - set(indices))
                raise ValueError(f"{volume}: slices {missing[:10]} between {start} and {stop - 1} were not "
                                 "predicted; a volume needs a contiguous range of slices")
            slab_shape = list(meta["volume_shape"])
            slab_shape[meta["axis"]] = stop - start
            prediction = restack_volume(np.stack([slices[i] for i in indices]), meta["geometry"], meta["axis"])
            if list(prediction.shape) != slab_shape:
                raise ValueError(f"{volume}: restacked shape {prediction.shape}, expected {slab_shape}")
            out.append(AssembledVolume(volume, meta["image_path"], meta["axis"], start, stop, prediction))
        return out
