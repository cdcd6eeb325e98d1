"""Dice and HD95 per class and per volume, with empty masks reported instead of hidden.

Per class c (foreground classes 1..N), with P = prediction == c and G = ground truth == c:

    status              Dice   HD95
    ok                  MONAI compute_dice   MONAI compute_hausdorff_distance(percentile=95), mm
    both_empty          1.0    None   (nothing to find, nothing found)
    empty_prediction    0.0    None   (the structure was missed)
    empty_ground_truth  0.0    None   (a structure was hallucinated)

HD95 is in millimetres, using the voxel spacing from the affine. Means over classes and
volumes include every Dice (the rules above define one for every case); HD95 means use the
defined values only, and how many were undefined is reported next to them. No NaN is ever
returned.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

STATUS_OK = "ok"
STATUS_BOTH_EMPTY = "both_empty"
STATUS_EMPTY_PREDICTION = "empty_prediction"
STATUS_EMPTY_GROUND_TRUTH = "empty_ground_truth"


def voxel_spacing(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size in mm along each array axis: the lengths of the affine's first three columns."""
    affine = np.asarray(affine, dtype=np.float64)
    return tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def score_masks(prediction: np.ndarray, ground_truth: np.ndarray,
                spacing: Sequence[float]) -> tuple[float, float | None, str]:
    """Two boolean masks of one shape -> (dice, hd95 in mm or None, status)."""
    has_pred, has_gt = bool(prediction.any()), bool(ground_truth.any())
    if not has_pred and not has_gt:
        return 1.0, None, STATUS_BOTH_EMPTY
    if not has_pred:
        return 0.0, None, STATUS_EMPTY_PREDICTION
    if not has_gt:
        return 0.0, None, STATUS_EMPTY_GROUND_TRUTH
    # Singleton axes (a 2-D image stored as [H, W, 1]) would make every voxel a surface voxel
    # for MONAI's edge finder, so they are dropped together with their spacing.
    keep = [i for i, n in enumerate(prediction.shape) if n > 1] or [0]
    shape = tuple(prediction.shape[i] for i in keep)
    y_pred = torch.from_numpy(prediction.reshape(shape).astype(np.float32))[None, None]
    y = torch.from_numpy(ground_truth.reshape(shape).astype(np.float32))[None, None]
    dice = float(compute_dice(y_pred, y, include_background=True, ignore_empty=False)[0, 0])
    with warnings.catch_warnings():
        # MONAI 1.6 warns about its own internal use of a deprecated argument.
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = float(compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95,
                                                spacing=[float(spacing[i]) for i in keep])[0, 0])
    return dice, hd95, STATUS_OK


def evaluate_volume(
    prediction: np.ndarray,
    ground_truth: np.ndarray,
    class_names: Sequence[str],
    affine: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    name: str = "volume",
) -> dict:
    """Score one predicted class-index volume against its ground truth.

    Args:
        prediction, ground_truth: class indices (0 = background), same shape ([X, Y, Z] or [H, W]).
        class_names: names by class index, background first (``len`` = N + 1).
        affine: [4, 4]; gives the voxel spacing. Or pass ``spacing`` directly (mm per axis).
            Neither: 1 mm.
        name: how the volume is called in reports.

    Returns:
        {"volume", "spacing_mm", "classes": [{"class_index", "name", "dice", "hd95_mm", "status",
        "predicted_voxels", "reference_voxels"}], "mean_dice", "mean_hd95_mm", "hd95_undefined"}
    """
    prediction, ground_truth = np.asarray(prediction), np.asarray(ground_truth)
    if prediction.shape != ground_truth.shape:
        raise ValueError(f"{name}: prediction shape {prediction.shape} differs from ground truth {ground_truth.shape}")
    if spacing is None:
        spacing = voxel_spacing(affine) if affine is not None else (1.0,) * prediction.ndim
    spacing = tuple(float(s) for s in spacing)[: prediction.ndim]
    if len(spacing) != prediction.ndim:
        raise ValueError(f"{name}: spacing {spacing} does not match {prediction.ndim} spatial axes")
    for label, volume in (("prediction", prediction), ("ground truth", ground_truth)):
        if volume.size and (volume.min() < 0 or volume.max() >= len(class_names)):
            raise ValueError(f"{name}: {label} holds class indices {int(volume.min())}..{int(volume.max())}, "
                             f"expected 0..{len(class_names) - 1} ({list(class_names)})")
    classes = []
    for index in range(1, len(class_names)):
        pred_mask, gt_mask = prediction == index, ground_truth == index
        dice, hd95, status = score_masks(pred_mask, gt_mask, spacing)
        classes.append({"class_index": index, "name": class_names[index], "dice": dice, "hd95_mm": hd95,
                        "status": status, "predicted_voxels": int(pred_mask.sum()),
                        "reference_voxels": int(gt_mask.sum())})
    return {
        "volume": name,
        "spacing_mm": list(spacing),
        "classes": classes,
        "mean_dice": _mean([c["dice"] for c in classes]),
        "mean_dice_present": _mean([c["dice"] for c in classes if c["reference_voxels"]]),
        "mean_hd95_mm": _mean([c["hd95_mm"] for c in classes if c["hd95_mm"] is not None]),
        "hd95_undefined": [c["name"] for c in classes if c["hd95_mm"] is None],
    }


def summarize(volume_results: Sequence[dict], class_names: Sequence[str]) -> dict:
    """Per-volume results -> per-class means over volumes and the overall means (over classes)."""
    per_class = []
    for index in range(1, len(class_names)):
        scores = [c for v in volume_results for c in v["classes"] if c["class_index"] == index]
        hd95s = [c["hd95_mm"] for c in scores if c["hd95_mm"] is not None]
        present = [c["dice"] for c in scores if c["reference_voxels"]]
        per_class.append({
            "class_index": index,
            "name": class_names[index],
            "mean_dice": _mean([c["dice"] for c in scores]),
            "mean_dice_present": _mean(present),
            "volumes_present": len(present),
            "mean_hd95_mm": _mean(hd95s),
            "volumes": len(scores),
            "volumes_with_hd95": len(hd95s),
            "status_counts": dict(Counter(c["status"] for c in scores)),
        })
    statuses = Counter(c["status"] for v in volume_results for c in v["classes"])
    return {
        "class_names": list(class_names),
        "volumes": list(volume_results),
        "per_class": per_class,
        "mean_dice": _mean([c["mean_dice"] for c in per_class if c["mean_dice"] is not None]),
        # Over the volumes where each class is in the ground truth: a class absent from a volume
        # and not predicted there scores 1.0 in mean_dice, which small structures make common.
        "mean_dice_present": _mean([c["mean_dice_present"] for c in per_class if c["mean_dice_present"] is not None]),
        "mean_hd95_mm": _mean([c["mean_hd95_mm"] for c in per_class if c["mean_hd95_mm"] is not None]),
        "status_counts": dict(statuses),
        "conventions": "Dice 1.0 when prediction and ground truth are both empty, 0.0 when only one is; "
                       "HD95 (mm) undefined (null) in those cases and left out of HD95 means. "
                       "mean_dice_present averages each class over the volumes whose ground truth holds it.",
    }


def evaluate_segmentation(
    predictions: Sequence[np.ndarray],
    ground_truths: Sequence[np.ndarray],
    class_names: Sequence[str],
    affines: Sequence[np.ndarray] | None = None,
    names: Sequence[str] | None = None,
) -> dict:
    """Score several volumes; returns ``summarize`` of their ``evaluate_volume`` results."""
    if len(predictions) != len(ground_truths):
        raise ValueError(f"{len(predictions)} predictions but {len(ground_truths)} ground truths")
    affines = affines if affines is not None else [None] * len(predictions)
    names = names if names is not None else [f"volume_{i}" for i in range(len(predictions))]
    results = [evaluate_volume(p, g, class_names, affine=a, name=n)
               for p, g, a, n in zip(predictions, ground_truths, affines, names)]
    return summarize(results, class_names)
