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
from medsaga_components.prompts.box_batches import McpPrepareBatch
from medsaga_components.inference.prompted import segment_slice_with_boxes
from medsaga_components.inference.two_pass import BoxFirstPass, TwoPassBoxSegmenter, two_pass_logits
from medsaga_components.prompts.from_labels import boxes_from_labels, stack_class_boxes
from medsaga_components.methods import build_network

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
    # The fragment changes the test evaluation by name: the handler list and the other handlers stay.
    assert parser.get("train#handlers") == plain.get("train#handlers")
    test_evaluation = parser.get_parsed_content("test_evaluation")
    assert test_evaluation.boxes == "ground_truth" and plain.get_parsed_content("test_evaluation").boxes is None
    # One switch gives every box a structure: training, validation and test.
    assert not train_batches.from_labels.per_structure
    parser.update({"box_per_structure": "true"})
    parser.parse()
    for key in ("train#prepare_batch", "validate#prepare_batch"):
        assert parser.get_parsed_content(key).from_labels.per_structure, key
    assert parser.get_parsed_content("test_evaluation").per_structure


@pytest.fixture(scope="module")
def trained_with_boxes(tmp_path_factory, demo_dir):
    root = tmp_path_factory.mktemp("medsaga_boxes")
    shutil.copytree(REPO / "bundles" / "medsaga" / "configs", root / "configs")
    # The starting model is validated too (a candidate for the best model, as on a new patient).
    done = run_bundle("training", configs("medsaga", "train", "boxes"), "--bundle_root", str(root),
                      "--dataset_dir", str(demo_dir), *TINY_TRAINING, "--validate_before_training", "true")
    return root, done.stdout + done.stderr


def test_training_with_boxes_saves_a_box_prompted_model_and_its_test_report(trained_with_boxes):
    root, log = trained_with_boxes
    served = TwoPassBoxSegmenter("lite_medsam_tiny", 2, checkpoint=None, image_size=64)
    served.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True), strict=True)
    assert not bool(served.prompt.use_modality) and not bool(served.prompt.use_content)
    assert "(ground_truth boxes)" in log
    report = json.loads((root / "eval" / "evaluation.json").read_text())
    assert len(report["volumes"]) == 2
    assert "Epoch[0] Metrics -- val_mean_dice" in log, "validate_before_training validates the starting model"
    summary = json.loads((root / "eval" / "training_summary.json").read_text())
    assert summary["best_epoch"] in (0, 1, 2)


def test_evaluating_with_boxes_uses_the_boxes(trained_with_boxes, demo_dir):
    root, _ = trained_with_boxes
    files = configs("medsaga", "train", "boxes", "evaluate")
    predictions = {}
    for boxes, per_structure in (("ground_truth", "false"), ("first_pass", "false"), ("ground_truth", "true")):
        out = root / f"eval_{boxes}_{per_structure}"
        run_bundle("evaluating", files, "--bundle_root", str(root), "--dataset_dir", str(demo_dir),
                   "--output_dir", str(out), "--test_boxes", boxes, "--box_per_structure", per_structure,
                   *TINY_TRAINING)
        predictions[boxes, per_structure] = [np.asarray(nib.load(p).dataobj)
                                             for p in sorted((out / "predictions").glob("*.nii.gz"))]
    class_boxes, whole_image, structure_boxes = predictions.values()
    assert len(class_boxes) == 2
    # Tight boxes per class against the whole image as every class's box, or a box per
    # structure (the grey-matter ribbon is several pieces): other prompts, other masks.
    assert any((a != b).any() for a, b in zip(class_boxes, whole_image))
    assert any((a != b).any() for a, b in zip(class_boxes, structure_boxes))
    at_training = np.asarray(nib.load(sorted((root / "eval" / "predictions").glob("*.nii.gz"))[0]).dataobj)
    np.testing.assert_array_equal(class_boxes[0], at_training)


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


# --- a box per structure ------------------------------------------------------------------

def _two_structure_labels() -> torch.Tensor:
    """``[2, 1, 32, 32]``: class 1 a left (6 x 6) and a right (4 x 4) piece, class 2 one piece;
    the second image holds class 1's left piece only."""
    labels = torch.zeros(2, 1, 32, 32, dtype=torch.long)
    labels[:, 0, 4:10, 2:8] = 1
    labels[0, 0, 20:24, 24:28] = 1
    labels[0, 0, 12:16, 12:20] = 2
    return labels


def test_a_box_per_structure_boxes_each_piece_largest_first():
    boxes, present = boxes_from_labels(_two_structure_labels(), 2, per_structure=True)
    assert boxes.shape == (2, 2, 2, 4) and present.tolist() == [[[True, True], [True, False]],
                                                                [[True, False], [False, False]]]
    assert boxes[0, 0].tolist() == [[2, 4, 7, 9], [24, 20, 27, 23]]
    assert boxes[0, 1, 0].tolist() == [12, 12, 19, 15] and boxes[1, 1, 0].tolist() == [0, 0, 31, 31]
    class_boxes, _ = boxes_from_labels(_two_structure_labels(), 2)
    assert class_boxes[0, 0].tolist() == [2, 4, 27, 23], "one box per class spans both pieces"
    jittered, _ = boxes_from_labels(_two_structure_labels(), 2, jitter=0.2, generator=torch.Generator().manual_seed(0),
                                    per_structure=True)
    assert (jittered[0, 0] - boxes[0, 0]).abs().max() <= 0.2 * 6 and (jittered != boxes)[present].any()


def test_a_class_with_several_boxes_takes_its_highest_logit_over_them():
    torch.manual_seed(0)
    net = build_network("mcp_medsam", "lite_medsam_tiny", num_classes=2, checkpoint=None, image_size=32,
                        prompt_options={"modality_prompt": False, "content_prompt": False}).eval()
    image = torch.rand(2, 1, 32, 32)
    boxes, present = boxes_from_labels(_two_structure_labels(), 2, per_structure=True)
    with torch.no_grad():
        both = net(image, {"boxes": boxes, "present": present})
        each = [net(image, {"boxes": boxes[:, :, k], "present": present[:, :, k]}) for k in range(2)]
    torch.testing.assert_close(both, torch.maximum(*each))
    assert not torch.equal(both[0, 1], each[0][0, 1]), "the second structure's box adds to class 1"
    assert (both[1, 2] < -1e3).all(), "a class with no box is not predicted"


def test_whole_image_boxes_replace_every_box_of_a_structure(demo_dir):
    labels = _two_structure_labels()
    batch = {"image": torch.rand(2, 1, 32, 32), "label": labels,
             "volume": [json.loads((demo_dir / "dataset.json").read_text())["training"][0]["image"]] * 2}
    prompts = McpPrepareBatch(2, str(demo_dir / "dataset.json"), whole_image_prob=1.0, seed=0,
                              per_structure=True).prompts(batch)
    assert prompts["boxes"][0, 0, 0].tolist() == prompts["boxes"][0, 1, 0].tolist() == [0, 0, 31, 31]
    assert prompts["present"].tolist() == [[[True, False], [True, False]], [[True, False], [False, False]]]


def test_box_free_inference_per_structure_boxes_each_piece_of_the_first_pass():
    calls = []

    def forward(image, prompts):  # class 1 in two pieces, class 2 nowhere
        calls.append(prompts)
        logits = torch.full((1, 3, 32, 32), -5.0)
        logits[:, 0] = 0.0
        logits[:, 1, 4:10, 2:8] = 5.0
        logits[:, 1, 20:24, 24:28] = 5.0
        return logits

    two_pass_logits(forward, torch.rand(1, 1, 32, 32), num_classes=2, image_size=32,
                    first_pass=BoxFirstPass(per_structure=True))
    second = calls[1]
    assert second["boxes"].shape == (1, 2, 2, 4) and second["present"].tolist() == [[[True, True], [False, False]]]
    torch.testing.assert_close(second["boxes"][0, 0], torch.tensor([[2.0, 4, 7, 9], [24, 20, 27, 23]]))


def test_a_user_may_give_a_class_one_box_per_structure():
    torch.manual_seed(0)
    net = build_network("mcp_medsam", "lite_medsam_tiny", num_classes=2, checkpoint=None, image_size=32,
                        prompt_options={"modality_prompt": False, "content_prompt": False}).eval()
    slice_ = torch.rand(24, 32)
    left, right = (2, 3, 9, 10), (20, 12, 27, 19)
    _, both = segment_slice_with_boxes(net, slice_, {"1": [left, right], "2": (10, 2, 20, 8)})
    _, only_left = segment_slice_with_boxes(net, slice_, {"1": left, "2": (10, 2, 20, 8)})
    _, only_right = segment_slice_with_boxes(net, slice_, {"1": [right], "2": (10, 2, 20, 8)})
    torch.testing.assert_close(both[1], torch.maximum(only_left[1], only_right[1]))
    torch.testing.assert_close(both[2], only_left[2])
    with pytest.raises(ValueError, match=r"box \[20.0, 12.0, 27.0, 30.0\] of class '1' is not inside the 32 x 24 slice"):
        segment_slice_with_boxes(net, slice_, {"1": [left, (20, 12, 27, 30)]})


def test_stacked_user_boxes_pad_the_classes_with_fewer_boxes_as_absent():
    boxes, present = stack_class_boxes({0: [(1, 2, 3, 4), (5, 6, 7, 8)], 2: [(0, 0, 9, 9)]}, 3, fill=(0, 0, 31, 31))
    assert boxes.shape == (3, 2, 4) and present.tolist() == [[True, True], [False, False], [True, False]]
    assert boxes[0, 1].tolist() == [5, 6, 7, 8] and boxes[1, 0].tolist() == boxes[2, 1].tolist() == [0, 0, 31, 31]
    single, single_present = stack_class_boxes({1: [(1, 2, 3, 4)]}, 2)
    assert single.shape == (2, 4) and single_present.tolist() == [False, True], "one box per class: [N, 4]"


def test_the_memory_efficient_mode_recomputes_each_box_pass_with_the_same_gradients():
    from medsaga_components.training.memory import disable_memory_efficient_training, enable_memory_efficient_training
    from medsaga_components.methods import build_optimizer, get_method

    method = get_method("medsaga").with_overrides(prompt="mcp")
    torch.manual_seed(0)
    net = build_network(method, "lite_medsam_tiny", num_classes=2, checkpoint=None, image_size=32,
                        prompt_options={"modality_prompt": False, "content_prompt": False}).train()
    boxes, present = boxes_from_labels(_two_structure_labels(), 2, per_structure=True)
    image = torch.rand(2, 1, 32, 32)

    def gradients():
        net.zero_grad()
        net(image, {"boxes": boxes, "present": present, "modality": "MRI"})[:, 1:].logsumexp(1).mean().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    kept = gradients()
    optimizer = enable_memory_efficient_training(net, build_optimizer(method, net), {"activation_checkpointing": True})
    assert net.checkpoint_box_passes
    disable_memory_efficient_training(net, optimizer)
    assert not net.checkpoint_box_passes
    net.checkpoint_box_passes = True  # only the box passes checkpointed: the encoder as before
    recomputed = gradients()
    assert kept.keys() == recomputed.keys() and any("mask_decoder" in n for n in kept)
    for name in kept:
        torch.testing.assert_close(recomputed[name], kept[name], msg=name)


def test_absent_classes_are_asked_with_random_boxes_when_training_says_so(tmp_path):
    """``absent_box_prob``: a class absent from an image is asked anyway (present, a box inside
    the image), so the model learns to answer "nothing here"; validation never does it."""
    labels = torch.zeros(4, 1, 40, 50, dtype=torch.long)
    labels[:, :, 5:15, 5:20] = 1  # class 2 absent everywhere
    batch = {"label": labels, "volume": ["imagesTr/case0.nii.gz"] * 4}
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({"modality": {"0": "MRI"}, "training": [{"image": "imagesTr/case0.nii.gz"}]}))
    asked = McpPrepareBatch(2, dataset_json, boxes="labels", seed=0, absent_box_prob=1.0).prompts(batch)
    assert asked["present"][:, 1].all() and asked["present"][:, 0].all()
    x0, y0, x1, y1 = asked["boxes"][:, 1].unbind(-1)
    assert ((x0 >= 0) & (x1 <= 49) & (y0 >= 0) & (y1 <= 39) & (x1 > x0) & (y1 > y0)).all()
    plain = McpPrepareBatch(2, dataset_json, boxes="labels", seed=0).prompts(batch)
    assert not plain["present"][:, 1].any()
    validation = McpPrepareBatch(2, dataset_json, boxes="labels", absent_box_prob=1.0).prompts(batch)
    assert not validation["present"][:, 1].any(), "without a seed (validation, test) nothing absent is asked"
    with pytest.raises(ValueError, match="absent_box_prob must be in"):
        McpPrepareBatch(2, dataset_json, seed=0, absent_box_prob=2.0)


@pytest.mark.parametrize("per_structure", [False, True])
def test_expanded_training_boxes_hold_the_structure_and_grow_only_outward(tmp_path, per_structure):
    """``expand``: every side moves outward by up to that share of the box's side, so the object
    is never cut (what propagation asks near a structure's end); validation boxes stay tight."""
    labels = torch.zeros(64, 1, 40, 50, dtype=torch.long)
    labels[:, :, 10:20, 12:32] = 1  # a 20 x 10 box: x 12..31, y 10..19
    batch = {"label": labels, "volume": ["imagesTr/case0.nii.gz"] * 64}
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({"modality": {"0": "MRI"}, "training": [{"image": "imagesTr/case0.nii.gz"}]}))
    grown = McpPrepareBatch(1, dataset_json, seed=0, expand=0.5, per_structure=per_structure).prompts(batch)["boxes"]
    x0, y0, x1, y1 = grown.reshape(64, 4).unbind(-1)
    assert (x0 <= 12).all() and (y0 <= 10).all() and (x1 >= 31).all() and (y1 >= 19).all()
    assert (x0 >= 12 - 10).all() and (x1 <= 31 + 10).all() and (y0 >= 10 - 5).all() and (y1 <= 19 + 5).all()
    assert (x0 < 11).any() and (x1 > 35).any(), "the growth is drawn, not fixed"
    assert (x0 >= 0).all() and (y1 <= 39).all()
    tight = McpPrepareBatch(1, dataset_json, expand=0.5, per_structure=per_structure).prompts(batch)["boxes"]
    assert torch.equal(tight.reshape(64, 4)[0], torch.tensor([12.0, 10.0, 31.0, 19.0])), "no seed: no growth"
    with pytest.raises(ValueError, match="expand must be in"):
        McpPrepareBatch(1, dataset_json, seed=0, expand=-0.1)


# --- choosing the model by one 3-D box per structure (configs/validate_box_3d.json) -------------

def test_validation_boxes_hold_each_structure_and_are_the_same_at_every_validation():
    from medsaga_components.training.volume_validation import BoxRequestsFromLabels

    label = torch.zeros(1, 40, 40, 12, dtype=torch.long)
    label[0, 4:10, 5:12, 2:6] = 1  # class 1: a left and a right structure
    label[0, 25:35, 20:30, 3:9] = 1
    label[0, 15:20, 30:36, 5:11] = 2
    requests = BoxRequestsFromLabels(["left-right", "single"], jitter=0.05, seed=3)
    request = requests.request(label)
    assert requests.request(label) == request  # checkpoints are compared on equal prompts
    assert sorted(request["boxes"]) == ["left-right", "single"]
    assert len(request["boxes"]["left-right"]) == 2 and len(request["boxes"]["single"]) == 1
    for name, c in (("left-right", 1), ("single", 2)):
        inside = np.zeros(label.shape[1:], dtype=bool)
        for i0, j0, k0, i1, j1, k1 in request["boxes"][name]:
            inside[int(i0):int(i1) + 1, int(j0):int(j1) + 1, int(k0):int(k1) + 1] = True
        covered = inside[label[0].numpy() == c].mean()
        assert covered > 0.6, f"{name}: a 5 % drag keeps most of the structure inside its box ({covered:.2f})"
    image = torch.zeros(1, 1, 40, 40, 12)
    _, _, _, kwargs = requests({"image": image, "label": label[None]})
    assert kwargs["prompts"] == request
    with pytest.raises(ValueError, match="one at a time"):
        requests({"image": image.repeat(2, 1, 1, 1, 1), "label": label[None].repeat(2, 1, 1, 1, 1)})
    with pytest.raises(ValueError, match="jitter"):
        BoxRequestsFromLabels(["a"], jitter=0.6)


def test_validation_from_3d_boxes_needs_validation_volumes(tmp_path, demo_dir):
    from medsaga_components.training.volume_validation import validation_volumes

    volumes = validation_volumes(demo_dir / "dataset.json")
    declared = json.loads((demo_dir / "dataset.json").read_text())["validation"]
    assert len(volumes) == len(declared)
    for item, entry in zip(volumes, declared):
        assert item["image"].meta["filename_or_obj"] == entry["image"]
        assert item["image"].shape == item["label"].shape == (1, *nib.load(demo_dir / entry["image"]).shape)
    dataset = json.loads((demo_dir / "dataset.json").read_text())
    del dataset["validation"]
    shutil.copytree(demo_dir, tmp_path / "no_validation")
    (tmp_path / "no_validation" / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(ValueError, match="validate_box_3d.json.*'validation' list"):
        validation_volumes(tmp_path / "no_validation" / "dataset.json")


@pytest.mark.parametrize("bundle", BOX_BUNDLES)
def test_a_model_chosen_by_3d_boxes_scores_its_validation_volumes_as_inference_does(bundle, demo_dir, tmp_path):
    """Training keeps the checkpoint of the best validation, and that validation is the volume
    Dice that ``run inference --prompts`` gives the kept model.pt from the same 3-D boxes."""
    from monai.metrics import compute_dice
    from medsaga_components.inference.volume import segment_volume_from_request
    from medsaga_components.training.volume_validation import BoxRequestsFromLabels, validation_volumes

    shutil.copytree(REPO / "bundles" / bundle / "configs", tmp_path / "configs")
    done = run_bundle("training", configs(bundle, "train", "boxes", "validate_box_3d"), "--bundle_root",
                      str(tmp_path), "--dataset_dir", str(demo_dir), *TINY_TRAINING)
    log = done.stdout + done.stderr
    assert log.count("Metrics -- val_mean_dice") == 2  # both epochs validated
    best = json.loads((tmp_path / "eval" / "training_summary.json").read_text())["best_validation"]
    served = TwoPassBoxSegmenter("lite_medsam_tiny", 2, checkpoint=None, image_size=64)
    served.load_state_dict(torch.load(tmp_path / "models" / "model.pt", weights_only=True), strict=True)
    served.eval()
    requests = BoxRequestsFromLabels(["grey matter", "white matter"], jitter=0.05, seed=0)
    scores = []
    for item in validation_volumes(demo_dir / "dataset.json"):
        labels = segment_volume_from_request(served, item["image"], 2, requests.request(item["label"]),
                                             {"grey matter": 1, "white matter": 2})
        onehot = lambda x: torch.nn.functional.one_hot(torch.as_tensor(x).long(), 3).movedim(-1, 0)[None]  # noqa: E731
        scores.append(compute_dice(onehot(labels), onehot(item["label"][0]), include_background=False))
    assert torch.cat(scores).nanmean().item() == pytest.approx(best, abs=1e-3)
