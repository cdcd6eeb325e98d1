"""Collect per-slice predictions from batches and regroup them into volumes (slabs).

A ``SliceDataset`` over validation/test ranges yields slices of several volumes in any
batch order; ``VolumeAssembler.add_batch`` brings each predicted slice back onto its own grid
and files it under its volume, and ``volumes()`` stacks them. Class logits come back through
``square_logits_to_labels`` (bilinear, then argmax: what ``run inference`` does too); class
maps from predictors without logits (box-prompted baselines) through nearest-exact sampling.
A range that covers only part of a volume (the ``slices`` hold-out) becomes a slab
``[start, stop)`` along the axis, with its affine shifted accordingly; a volume with several
such ranges gives one slab each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medsaga_components.data.slicing import slices_to_volume
from medsaga_components.data.square_resize import SquareGeometry, square_logits_to_labels, undo_resize_pad_labels


@dataclass(frozen=True)
class AssembledVolume:
    volume: str  # image path as in dataset.json
    image_path: str
    axis: int
    slice_start: int
    slice_stop: int
    prediction: np.ndarray  # int64 class indices, the volume's shape except (stop - start) along axis


def slice_classes_on_grid(prediction: torch.Tensor | np.ndarray, geometry: SquareGeometry) -> np.ndarray:
    """One slice's prediction in the ``S x S`` square -> int64 class indices [H, W] on its own grid.

    ``prediction``: class logits, float [K, S, S] (bilinear to the grid, then argmax), or class
    indices, integer [S, S] or [1, S, S] (nearest-exact).
    """
    prediction = torch.as_tensor(prediction)
    if prediction.is_floating_point():
        if prediction.ndim != 3 or prediction.shape[0] < 2:
            raise ValueError("a floating-point prediction must be class logits [K, S, S] with K >= 2, got shape "
                             f"{tuple(prediction.shape)}; return class indices as an integer tensor")
        return square_logits_to_labels(prediction[None], geometry)[0].numpy()
    if prediction.ndim == 3 and prediction.shape[0] == 1:
        prediction = prediction[0]
    if prediction.ndim != 2:
        raise ValueError(f"class indices must be [S, S] or [1, S, S], got shape {tuple(prediction.shape)}")
    return undo_resize_pad_labels(prediction.long().numpy(), geometry)


class VolumeAssembler:
    def __init__(self) -> None:
        # volume -> {slice index -> [H, W] class map on the slice's own grid}, plus per-volume metadata
        self._slices: dict[str, dict[int, np.ndarray]] = {}
        self._meta: dict[str, dict] = {}

    def add_batch(self, predictions: torch.Tensor | np.ndarray, batch: dict) -> None:
        """predictions: class logits, float [B, K, S, S], or class indices, integer [B, S, S] or
        [B, 1, S, S] (see ``slice_classes_on_grid``); batch: the collated samples' metadata."""
        predictions = torch.as_tensor(predictions).detach().cpu()
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
            on_grid = slice_classes_on_grid(predictions[b], SquareGeometry.from_values(geometry))
            self._slices.setdefault(volume, {})[int(batch["slice_index"][b])] = on_grid

    def volumes(self) -> list[AssembledVolume]:
        """One ``AssembledVolume`` per contiguous run of predicted slices of a volume (the
        ``slices`` hold-out gives a volume several test or validation blocks)."""
        out = []
        for volume, slices in self._slices.items():
            meta = self._meta[volume]
            indices = sorted(slices)
            runs = np.split(np.asarray(indices), np.flatnonzero(np.diff(indices) > 1) + 1)
            for run in runs:
                start, stop = int(run[0]), int(run[-1]) + 1
                slab_shape = list(meta["volume_shape"])
                slab_shape[meta["axis"]] = stop - start
                prediction = np.ascontiguousarray(slices_to_volume(np.stack([slices[i] for i in run]), meta["axis"]))
                if list(prediction.shape) != slab_shape:
                    raise ValueError(f"{volume}: restacked shape {prediction.shape}, expected {slab_shape}")
                out.append(AssembledVolume(volume, meta["image_path"], meta["axis"], start, stop, prediction))
        return out
