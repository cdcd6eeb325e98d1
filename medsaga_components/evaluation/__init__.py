"""Evaluation: slice predictions back to volumes, Dice/HD95 per class and volume, reports, overlays."""

from medsaga_components.evaluation.assemble import AssembledVolume, VolumeAssembler
from medsaga_components.evaluation.metrics import (
    STATUS_BOTH_EMPTY,
    STATUS_EMPTY_GROUND_TRUTH,
    STATUS_EMPTY_PREDICTION,
    STATUS_OK,
    evaluate_segmentation,
    evaluate_volume,
    score_masks,
    summarize,
    voxel_spacing,
)
from medsaga_components.evaluation.overlays import save_overlays
from medsaga_components.evaluation.pipeline import evaluate_slice_dataset
from medsaga_components.evaluation.report import markdown_table, write_report
from medsaga_components.evaluation.restack import restack_volume, save_nifti

__all__ = [
    "AssembledVolume", "STATUS_BOTH_EMPTY", "STATUS_EMPTY_GROUND_TRUTH", "STATUS_EMPTY_PREDICTION", "STATUS_OK",
    "VolumeAssembler", "evaluate_segmentation", "evaluate_slice_dataset", "evaluate_volume", "markdown_table",
    "restack_volume", "save_nifti", "save_overlays", "score_masks", "summarize", "voxel_spacing", "write_report",
]
