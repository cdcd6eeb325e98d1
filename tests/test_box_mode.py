"""The box-prompted mode of the prompt-free bundles (``configs/boxes.json`` for training and
evaluation, ``configs/inference_boxes.json`` for inference), run as users run it."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from bundle_runs import REPO, TINY_TRAINING, configs, run_bundle
from medsaga_components.engine.box_batches import McpPrepareBatch
from medsaga_components.engine.box_inference import TwoPassBoxSegmenter

BOX_BUNDLES = ("medsaga", "samed")


@pytest.mark.parametrize("bundle", BOX_BUNDLES)
def test_boxes_json_switches_prompts_batches_and_test_evaluation(bundle, demo_dir, tmp_path):
    parser = ConfigParser()
    parser.read_config([configs(bundle, "train"), configs(bundle, "boxes")])
    parser.update({"bundle_root": str(tmp_path), "dataset_dir": str(demo_dir)})
    plain = ConfigParser()
    plain.read_config(configs(bundle, "train"))
    # Only the prompt changes in the method: its adapters, rates and loss stay the bundle's.
    assert parser.get_parsed_content("method_def").prompt == "mcp"
    assert parser.get_parsed_content("method_def") == plain.get_parsed_content("method_def").with_overrides(prompt="mcp")
    train_batches = parser.get_parsed_content("train#prepare_batch")
    assert isinstance(train_batches, McpPrepareBatch) and train_batches.boxes == "labels"
    assert train_batches.from_labels.jitter > 0 and train_batches.whole_image_prob > 0
    assert parser.get_parsed_content("validate#prepare_batch").whole_image_prob == 0  # tight boxes, no noise
    for key in ("train#trainer#prepare_batch", "validate#evaluator#prepare_batch"):
        assert parser.get(key).replace("::", "#") == "@" + key.split("#")[0] + "#prepare_batch", key
    # The fragment replaces the test evaluation in place: the handler list keeps its order.
    handlers = parser.get("train#handlers")
    assert [h["_target_"].rsplit(".", 1)[-1] for h in handlers] == [
        h["_target_"].rsplit(".", 1)[-1] for h in plain.get("train#handlers")[:5]] + ["EvaluateBoxPromptedOnTestVolumes"]


@pytest.fixture(scope="module")
def trained_with_boxes(tmp_path_factory, demo_dir):
    root = tmp_path_factory.mktemp("medsaga_boxes")
    shutil.copytree(REPO / "bundles" / "medsaga" / "configs", root / "configs")
    done = run_bundle("training", configs("medsaga", "train", "boxes"), "--bundle_root", str(root),
                      "--dataset_dir", str(demo_dir), *TINY_TRAINING)
    return root, done.stdout + done.stderr


def test_training_with_boxes_saves_a_box_prompted_model_and_its_test_report(trained_with_boxes):
    root, log = trained_with_boxes
    served = TwoPassBoxSegmenter("lite_medsam_tiny", 2, checkpoint=None, image_size=64)
    served.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True), strict=True)
    assert not bool(served.prompt.use_modality) and not bool(served.prompt.use_content)
    assert "(ground_truth boxes)" in log
    report = json.loads((root / "eval" / "evaluation.json").read_text())
    assert len(report["volumes"]) == 2


def test_evaluating_with_boxes_uses_the_boxes(trained_with_boxes, demo_dir):
    root, _ = trained_with_boxes
    files = configs("medsaga", "train", "boxes", "evaluate")
    predictions = {}
    for boxes in ("ground_truth", "first_pass"):
        out = root / f"eval_{boxes}"
        run_bundle("evaluating", files, "--bundle_root", str(root), "--dataset_dir", str(demo_dir),
                   "--output_dir", str(out), "--test_boxes", boxes, *TINY_TRAINING)
        predictions[boxes] = [np.asarray(nib.load(p).dataobj) for p in sorted((out / "predictions").glob("*.nii.gz"))]
    assert len(predictions["ground_truth"]) == 2
    # Tight boxes per class against the whole image as every class's box: other prompts, other masks.
    assert any((a != b).any() for a, b in zip(predictions["ground_truth"], predictions["first_pass"]))
    at_training = np.asarray(nib.load(sorted((root / "eval" / "predictions").glob("*.nii.gz"))[0]).dataobj)
    np.testing.assert_array_equal(predictions["ground_truth"][0], at_training)


def test_inference_with_boxes_fragment_segments_volumes_box_free(trained_with_boxes, demo_dir):
    root, _ = trained_with_boxes
    out = root / "eval" / "inference"
    run_bundle("inference", configs("medsaga", "inference", "inference_boxes"), "--bundle_root", str(root),
               "--dataset_dir", str(demo_dir), "--backbone", "lite_medsam_tiny", "--image_size", "64")
    inputs = json.loads((demo_dir / "dataset.json").read_text())["test"]
    outputs = sorted(out.glob("*_seg.nii.gz"))
    assert len(outputs) == len(inputs)
    for entry, written in zip(sorted(inputs, key=lambda e: e["image"]), outputs):
        assert nib.load(written).shape == nib.load(demo_dir / entry["image"]).shape
        assert set(np.unique(np.asarray(nib.load(written).dataobj))) <= {0, 1, 2}


def test_inference_without_the_fragment_names_the_mismatch(trained_with_boxes, demo_dir):
    """A box-trained model.pt given to the prompt-free inference.json fails with the file named."""
    root, _ = trained_with_boxes
    done = run_bundle("inference", configs("medsaga", "inference"), "--bundle_root", str(root),
                      "--dataset_dir", str(demo_dir), "--backbone", "lite_medsam_tiny", "--image_size", "64",
                      check=False)
    assert done.returncode != 0
    assert "model.pt" in done.stdout + done.stderr

