"""Evaluate a slice predictor on the validation/test volumes of a ``SliceDataset``.

Predict every slice, restack per volume (or slab), score against the ground truth on the
original grid, and write predictions (NIfTI), overlays (PNG) and the report (JSON +
Markdown). This is the glue an evaluation handler or script calls; the model is just a
function from images to class logits (or class maps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from medsaga_components.data.dataset import SliceDataset
from medsaga_components.data.slicing import crop_slab
from medsaga_components.data.dicom_series import series_file_stem
from medsaga_components.data.volume_io import read_geometry
from medsaga_components.evaluation.assemble import VolumeAssembler
from medsaga_components.evaluation.metrics import evaluate_volume, summarize
from medsaga_components.evaluation.overlays import save_overlays
from medsaga_components.evaluation.report import write_report
from medsaga_components.evaluation.restack import save_nifti


def _volume_file_stem(volume: str) -> str:
    """A file's name without its suffix; a DICOM series folder (as dataset.json writes it) by its
    relative path, since series folders are often named alike (``pat_1/CT`` -> ``pat_1_CT``)."""
    name = Path(volume).name
    for suffix in (".nii.gz", ".nii", ".png"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name if Path(volume).is_absolute() else series_file_stem(volume) or name


@torch.no_grad()
def evaluate_slice_dataset(
    dataset: SliceDataset,
    predict: Callable[[torch.Tensor], torch.Tensor],
    out_dir: str | Path,
    batch_size: int = 4,
    overlay_slices: int = 3,
    save_predictions: bool = True,
    predict_from_batch: bool = False,
) -> dict:
    """Run ``predict`` over ``dataset`` and evaluate per volume.

    Args:
        dataset: slices covering contiguous ranges of each evaluated volume, with labels
            (e.g. ``SliceDataset.from_manifest(m, part="test")``).
        predict: images [B, 1, S, S] float -> class logits, float [B, N + 1, S, S], resized to
            each slice's grid (bilinear) before the argmax, as ``run inference`` does; or class
            indices, integer [B, S, S] or [B, 1, S, S] (nearest-exact), for predictors without
            logits. See ``VolumeAssembler.add_batch``.
        predict_from_batch: call ``predict(batch)`` with the whole sample dict instead (for
            reference predictors that take prompts from the ground truth, e.g. boxes).
        out_dir: receives ``predictions/<name>.nii.gz``, ``overlays/*.png``, ``evaluation.json/.md``.

    Returns:
        The ``summarize`` dict, plus ``"files"``: the paths written.
    """
    out_dir = Path(out_dir)
    assembler = VolumeAssembler()
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        assembler.add_batch(predict(batch) if predict_from_batch else predict(batch["image"]), batch)
    labels_of = {ref.volume: ref.label for ref in dataset.slices}
    results, files = [], {"predictions": [], "overlays": []}
    for assembled in assembler.volumes():
        label = labels_of[assembled.volume]
        if label is None:
            raise ValueError(f"{assembled.volume}: no label in the dataset, cannot be evaluated")
        image, classes = dataset.load_volume(assembled.volume, label)
        _, affine = read_geometry(assembled.image_path)
        span = (assembled.axis, assembled.slice_start, assembled.slice_stop)
        truth, slab_affine = crop_slab(classes, affine, *span)
        full = assembled.slice_stop - assembled.slice_start == image.shape[assembled.axis]
        name = _volume_file_stem(assembled.volume) + ("" if full else f"_slices{span[1]:03d}-{span[2]:03d}")
        results.append(evaluate_volume(assembled.prediction, truth, dataset.class_names, affine=slab_affine, name=name))
        if save_predictions:
            files["predictions"].append(save_nifti(dataset.dataset.class_map.to_values(assembled.prediction),
                                                   slab_affine, out_dir / "predictions" / f"{name}.nii.gz"))
        if overlay_slices:
            image_slab, _ = crop_slab(image, affine, *span)
            files["overlays"] += save_overlays(image_slab, truth, assembled.prediction, out_dir / "overlays",
                                               assembled.axis, max_slices=overlay_slices, prefix=name)
    summary = summarize(results, dataset.class_names)
    files.update(write_report(summary, out_dir, title=f"Evaluation of {dataset.dataset.name}"))
    return {**summary, "files": files}
