"""The reference points of the docs' results tables, on the real demo data (64 px to stay fast)."""

import json

import pytest

from medsaga_components.baselines import baseline_command, unet_from_scratch, zero_shot_boxes
from medsaga_components.training.experiment import FewShotExperiment


def _experiment(tmp_path):
    return FewShotExperiment(tmp_path / "mni152_demo", tmp_path / "out", shots=2, image_size=64, rotation_degrees=0)


def test_unet_from_scratch_trains_for_the_given_time_then_evaluates(tmp_path):
    summary = unet_from_scratch(_experiment(tmp_path), tmp_path / "unet", seconds=3, batch_size=2)
    assert summary["training_steps"] >= 1 and summary["training_seconds"] >= 3
    assert [c["name"] for c in summary["per_class"]] == ["grey matter", "white matter"]
    report = json.loads((tmp_path / "unet" / "evaluation.json").read_text())
    assert report["mean_dice"] == summary["mean_dice"]


def test_zero_shot_boxes_segment_inside_the_ground_truth_boxes(tmp_path):
    """Pretrained LiteMedSAM with a box per class finds a good part of each tissue; without
    training, white matter (inside the grey matter's box) is the harder one."""
    summary = zero_shot_boxes(_experiment(tmp_path), tmp_path / "zero_shot")
    dice = {c["name"]: c["mean_dice"] for c in summary["per_class"]}
    assert dice["grey matter"] > 0.2 and dice["white matter"] > 0.0, dice


def test_baseline_command_rejects_an_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="'zero_shot_boxes' or 'unet_from_scratch', got 'nnunet'"):
        baseline_command("nnunet", str(tmp_path / "data"), str(tmp_path / "out"), image_size=64)
    with pytest.raises(ValueError, match="boxes must be one of .*'class', 'structure'.*got 'organ'"):
        zero_shot_boxes(None, tmp_path / "zero_shot", boxes="organ")  # refused before any work
