"""Restacking, NIfTI output, Dice/HD95 with explicit empty cases, reports, overlays, end to end."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from data_synthetic import SPACING, write_dataset
from medsaga_components.data import ClassMap, SliceDataset, fewshot_command, resize_pad_labels, volume_to_slices
from medsaga_components.evaluation import (
    STATUS_BOTH_EMPTY,
    STATUS_EMPTY_GROUND_TRUTH,
    STATUS_EMPTY_PREDICTION,
    STATUS_OK,
    evaluate_segmentation,
    evaluate_slice_dataset,
    evaluate_volume,
    markdown_table,
    restack_volume,
    save_nifti,
    save_overlays,
    voxel_spacing,
    write_report,
)
from medsaga_components.evaluation.overlays import ALPHA, class_colour

NAMES = ("background", "box", "ball")


def _box(shape=(40, 36, 30), start=(10, 8, 6), size=(10, 20, 16)) -> np.ndarray:
    volume = np.zeros(shape, dtype=np.int64)
    volume[tuple(slice(s, s + n) for s, n in zip(start, size))] = 1
    return volume


def test_perfect_prediction_scores_dice_one_and_hd95_zero():
    truth = _box()
    truth[30:34, 28:32, 20:24] = 2
    result = evaluate_volume(truth.copy(), truth, NAMES, spacing=SPACING)
    assert [c["status"] for c in result["classes"]] == [STATUS_OK, STATUS_OK]
    assert [c["dice"] for c in result["classes"]] == [1.0, 1.0]
    assert [c["hd95_mm"] for c in result["classes"]] == [0.0, 0.0]


def test_shifted_box_scores_what_geometry_says():
    truth = _box()
    shifted = np.roll(truth, 2, axis=0)  # 2 voxels along x, voxels 1.5 mm wide along x
    affine = np.diag([1.5, 1.0, 1.0, 1.0])
    result = evaluate_volume(shifted, truth, NAMES[:2], affine=affine)
    box = result["classes"][0]
    assert box["hd95_mm"] == pytest.approx(3.0)
    overlap = (10 - 2) * 20 * 16
    assert box["dice"] == pytest.approx(2 * overlap / (2 * 10 * 20 * 16))
    # the same shift along z (2.0 mm voxels) is 4 mm
    assert evaluate_volume(np.roll(truth, 2, axis=2), truth, NAMES[:2], spacing=SPACING)["classes"][0][
        "hd95_mm"] == pytest.approx(4.0)


def test_two_d_images_stored_with_a_singleton_axis():
    truth = np.zeros((30, 30, 1), dtype=np.int64)
    truth[5:15, 5:20] = 1
    result = evaluate_volume(np.roll(truth, 3, axis=1), truth, NAMES[:2], spacing=(1.0, 0.5, 1.0))
    assert result["classes"][0]["hd95_mm"] == pytest.approx(1.5)


def test_empty_cases_are_reported_not_nan(tmp_path):
    truth = _box()
    result = evaluate_volume(np.zeros_like(truth), truth, NAMES, spacing=SPACING)  # box missed, no ball
    box, ball = result["classes"]
    assert (box["status"], box["dice"], box["hd95_mm"]) == (STATUS_EMPTY_PREDICTION, 0.0, None)
    assert (ball["status"], ball["dice"], ball["hd95_mm"]) == (STATUS_BOTH_EMPTY, 1.0, None)
    hallucinated = evaluate_volume(truth * 2, np.zeros_like(truth), NAMES, spacing=SPACING)["classes"][1]
    assert (hallucinated["status"], hallucinated["dice"], hallucinated["hd95_mm"]) == (
        STATUS_EMPTY_GROUND_TRUTH, 0.0, None)
    assert result["mean_dice"] == 0.5 and result["mean_hd95_mm"] is None
    assert result["hd95_undefined"] == ["box", "ball"]
    summary = evaluate_segmentation([np.zeros_like(truth), truth.copy()], [truth, truth], NAMES, names=["a", "b"])
    json.dumps(summary, allow_nan=False)  # raises on any NaN
    assert summary["per_class"][0]["mean_dice"] == 0.5 and summary["per_class"][0]["volumes_with_hd95"] == 1
    assert summary["status_counts"] == {STATUS_EMPTY_PREDICTION: 1, STATUS_BOTH_EMPTY: 2, STATUS_OK: 1}
    paths = write_report(summary, tmp_path, title="t")
    markdown = open(paths["markdown"]).read()
    assert "| a | box | 0.0000 | n/a (empty_prediction) | empty_prediction |" in markdown
    assert "| b | box | 1.0000 | 0.0000 | ok |" in markdown
    assert json.loads(open(paths["json"]).read())["per_class"][1]["mean_hd95_mm"] is None


def test_classes_absent_from_the_ground_truth_do_not_inflate_the_present_mean():
    truth = _box()  # the ball is in no volume's ground truth
    result = evaluate_volume(np.zeros_like(truth), truth, NAMES, spacing=SPACING)
    assert result["mean_dice"] == 0.5  # the absent, unpredicted ball counts as 1.0
    assert result["mean_dice_present"] == 0.0  # only the missed box is present
    summary = evaluate_segmentation([np.zeros_like(truth), truth.copy()], [truth, truth], NAMES, names=["a", "b"])
    box, ball = summary["per_class"]
    assert (box["mean_dice_present"], box["volumes_present"]) == (0.5, 2)
    assert (ball["mean_dice_present"], ball["volumes_present"]) == (None, 0)
    assert summary["mean_dice"] == 0.75 and summary["mean_dice_present"] == 0.5
    assert "| **mean** | **classes present in the ground truth** | **0.5000** |" in markdown_table(summary)


def test_voxel_spacing_comes_from_the_affine_columns():
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 0.8, 3.0])
    assert voxel_spacing(affine) == pytest.approx((0.8, 0.8, 3.0))


@pytest.mark.parametrize("shape,axis", [((37, 53, 6), 2), ((12, 90, 40), 0), ((64, 5, 64), 1)])
def test_restack_undoes_slicing_resize_and_padding(shape, axis):
    labels = np.random.default_rng(0).integers(0, 3, shape)
    squares, geometries = zip(*(resize_pad_labels(s, 128) for s in volume_to_slices(labels, axis)))
    predictions = torch.from_numpy(np.stack(squares))[:, None]  # [N, 1, S, S] as a network would give
    geometry = torch.stack([g.as_tensor() for g in geometries])  # [N, 5] as a batch would give
    assert np.array_equal(restack_volume(predictions, geometry, axis), labels)
    class_map = ClassMap((0, 1, 4), NAMES)
    assert np.array_equal(restack_volume(predictions, geometry, axis, class_map=class_map),
                          np.array([0, 1, 4])[labels])
    # a subset of slices placed back into the full volume; the rest stays background
    picked = [1, 3]
    partial = restack_volume(predictions[picked], geometry[0], axis, slice_indices=picked, volume_shape=shape)
    assert np.array_equal(np.take(partial, picked, axis=axis), np.take(labels, picked, axis=axis))
    assert not np.take(partial, 0, axis=axis).any()


def test_save_nifti_keeps_data_and_affine_and_leaves_no_temp_files(tmp_path):
    volume = _box() * 2
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = (-5, 6, 7)
    path = save_nifti(volume, affine, tmp_path / "out" / "pred.nii.gz")
    image = nib.load(path)
    assert np.array_equal(np.asarray(image.dataobj), volume) and image.get_data_dtype() == np.uint8
    assert np.allclose(image.affine, affine)
    assert os.listdir(tmp_path / "out") == ["pred.nii.gz"]
    with pytest.raises(ValueError, match="nii"):
        save_nifti(volume, affine, tmp_path / "pred.png")


def test_overlays_show_image_truth_and_prediction(tmp_path):
    truth = _box(shape=(20, 24, 10), start=(4, 4, 2), size=(8, 8, 6))
    prediction = np.where(truth == 1, 2, 0)
    image = np.random.default_rng(0).random(truth.shape)
    paths = save_overlays(image, truth, prediction, tmp_path, axis=2, max_slices=3, prefix="case")
    assert len(paths) == 3 and all(p.endswith(".png") for p in paths)
    assert [os.path.basename(p) for p in paths] == ["case_slice002.png", "case_slice004.png", "case_slice007.png"]
    panel = np.asarray(Image.open(paths[0]).convert("RGB")).astype(int)
    width = panel.shape[1]
    assert width > 3 * 20  # three panels side by side
    third = (width - 8) // 3

    def tinted(part, colour):
        """Some pixel is grey blended with ``colour``: removing the colour leaves equal channels."""
        grey_part = part - ALPHA * np.array(colour)
        blended = grey_part.max(-1) - grey_part.min(-1) <= 2
        coloured = part.max(-1) - part.min(-1) > 20
        return bool(np.any(blended & coloured))

    truth_panel, pred_panel = panel[:, third + 4: 2 * third + 4], panel[:, 2 * third + 8:]
    assert tinted(truth_panel, class_colour(1)) and tinted(pred_panel, class_colour(2))
    assert not tinted(truth_panel, class_colour(2)) and not tinted(pred_panel, class_colour(1))
    assert not tinted(panel[:, :third], class_colour(1))  # the plain image panel is grey


def test_end_to_end_oracle_scores_one_and_writes_outputs(tmp_path):
    dataset_json = write_dataset(tmp_path / "data", n_training=1)  # one volume: slice-range hold-out
    manifest = fewshot_command(str(dataset_json), 3, out=str(tmp_path / "m.json"))
    test_slices = SliceDataset.from_manifest(manifest, part="test", image_size=48)
    truth_batches = iter([test_slices[i]["label"] for i in range(len(test_slices))])

    def oracle(images):  # returns the ground truth, in the order the evaluator asks
        return torch.stack([next(truth_batches) for _ in range(images.shape[0])])

    summary = evaluate_slice_dataset(test_slices, oracle, tmp_path / "eval", batch_size=3, overlay_slices=2)
    assert summary["mean_dice"] == 1.0 and summary["mean_hd95_mm"] == 0.0
    test_ranges = json.loads(open(manifest).read())["test"]  # interleaved blocks: one slab each
    assert len(test_ranges) > 1 and len(summary["volumes"]) == len(test_ranges)
    truth = nib.load(str(dataset_json.parent / "labelsTr" / "case0.nii.gz"))
    for volume, test_range, prediction_path in zip(summary["volumes"], test_ranges, summary["files"]["predictions"]):
        start, stop = test_range["slice_start"], test_range["slice_stop"]
        assert volume["volume"] == f"case0_slices{start:03d}-{stop:03d}"
        saved = nib.load(prediction_path)
        assert np.array_equal(np.asarray(saved.dataobj), np.asarray(truth.dataobj)[:, :, start:stop])
        assert np.allclose(saved.affine @ [0, 0, 0, 1], truth.affine @ [0, 0, start, 1])
    assert len(summary["files"]["overlays"]) == 2 * len(test_ranges)  # overlay_slices per slab
    assert os.path.isfile(summary["files"]["markdown"]) and os.path.isfile(summary["files"]["json"])
