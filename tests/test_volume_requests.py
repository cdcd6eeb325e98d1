"""A user's request for a volume through the two doors users take: ``run inference --prompts``
of a box-mode bundle, and MONAI Label's box request (the app's ``ServedBundle`` path, without
the server: ``test_monailabel_app.py`` runs that). Same prompts, same label map; bad requests
fail before any slice runs, naming what is wrong."""

import json
import re
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from bundle_runs import REPO
from data_synthetic import write_dataset
from medsaga_components import SamSegmenter
from medsaga_components.adapters.export import save_plain_model
from medsaga_components.inference.model import served_labels, write_model_info
from medsaga_components.inference.two_pass import TwoPassBoxSegmenter
from medsaga_components.inference.volume import parse_request

sys.path.insert(0, str(REPO / "monailabel_app"))
from medsaga_label.bundles import discover_bundles  # noqa: E402

SIZE = 64
CLASSES = ["ring", "blob"]
BOX = [5, 4, 3, 20, 18, 8]
OVERRIDES = {"backbone": "lite_medsam_tiny", "image_size": SIZE, "keep_freed_cpu_memory": False}


def box_mode_model(path):
    """A tiny box-mode medsaga model saved the way training saves it (model.pt + model.json),
    its read-out answering every box with "inside"."""
    torch.manual_seed(0)
    network = TwoPassBoxSegmenter("lite_medsam_tiny", 2, checkpoint=None, image_size=SIZE, modality_prompt=False,
                                  content_prompt=False)
    with torch.no_grad():
        for mlp in network.backbone.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.fill_(1.0)
    save_plain_model(network, path)
    write_model_info(network, path, CLASSES)
    return network


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles") / "medsaga"
    shutil.copytree(REPO / "bundles" / "medsaga" / "configs", root / "configs")
    box_mode_model(root / "models" / "model.pt")
    data = write_dataset(root.parent / "data", n_training=1, n_test=1).parent
    return root, data


def run_inference(root, data, prompts, tmp_path, out="out", **overrides):
    folder = root / "configs"
    workflow = ConfigWorkflow(config_file=[str(folder / "inference.json"), str(folder / "inference_boxes.json")],
                              workflow_type="infer", meta_file=str(folder / "metadata.json"), logging_file=False,
                              bundle_root=str(root), dataset_dir=str(data), prompts=str(prompts),
                              output_dir=str(tmp_path / out), **OVERRIDES, **overrides)
    workflow.initialize()
    workflow.run()
    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted((tmp_path / out).glob("*_seg.nii.gz"))}


def test_run_inference_and_monai_label_give_the_same_label_map_never_outside_the_box(bundle, tmp_path):
    root, data = bundle
    request = {"boxes": {"ring": [BOX]}}
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"case0.nii.gz": request}))
    written = run_inference(root, data, prompts, tmp_path)
    labels = written["case0_seg.nii.gz"]
    inside = np.zeros(labels.shape, bool)
    inside[5:21, 4:19, 3:9] = True
    assert (labels[inside] == 1).any() and (labels[~inside] == 0).all()

    served = discover_bundles(root.parent, OVERRIDES)["medsaga"]
    assert served.box_mode and served.labels == {"ring": 1, "blob": 2}  # the names training recorded
    item = {"image": str(data / "imagesTs" / "case0.nii.gz")}
    for transform in served.preprocessing():
        item = transform(item)
    network = served.build_network()
    network.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    with torch.no_grad():
        scores = served.inferer()(item["image"][None], network.eval(), prompts=request)
    np.testing.assert_array_equal(scores.argmax(1)[0].numpy(), labels)


def test_a_pretrained_guide_propagates_a_request_through_both_doors(bundle, tmp_path):
    # propagation_guide "pretrained" reaches both doors: run inference and MONAI Label give the same map.
    root, data = bundle
    box = [11, 4, 8, 27, 20, 21]  # around the largest blob of case0, loosely
    request = {"boxes": {"ring": [box]}}
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"case0.nii.gz": request}))
    guided = run_inference(root, data, prompts, tmp_path, propagation_guide="pretrained")["case0_seg.nii.gz"] == 1

    served = discover_bundles(root.parent, {**OVERRIDES, "propagation_guide": "pretrained"})["medsaga"]
    item = {"image": str(data / "imagesTs" / "case0.nii.gz")}
    for transform in served.preprocessing():
        item = transform(item)
    network = served.build_network()
    network.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    inferer = served.inferer()
    with torch.no_grad():
        scores = inferer(item["image"][None], network.eval(), prompts=request)
    np.testing.assert_array_equal(scores.argmax(1)[0].numpy() == 1, guided)  # MONAI Label: the same label map

    inside = np.zeros(guided.shape, bool)
    inside[11:28, 4:21, 8:22] = True
    assert guided.any() and not (guided & ~inside).any()
    # The guide is pretrained LiteMedSAM, built once (test_volume_prompts.py shows that it, not the
    # network, decides where the structure is).
    guide = inferer.guide_for(network)
    assert guide is inferer.guide_for(network) and guide.prompt.user_input == "boxes"
    pretrained = SamSegmenter("lite_medsam", 2, checkpoint="pretrained", prompt="boxes").state_dict()
    assert all(torch.equal(value, pretrained[name]) for name, value in guide.state_dict().items())

    with pytest.raises(Exception) as error:
        run_inference(root, data, prompts, tmp_path, out="bad", propagation_guide="teacher")
    assert "propagation_guide is 'teacher'; expected one of ('self', 'pretrained')" in messages(error.value)


def messages(error: BaseException) -> str:
    """The error and its causes (MONAI wraps a component's error in its own)."""
    chain = []
    while error is not None:
        chain.append(str(error))
        error = error.__cause__
    return "\n".join(chain)


def test_bad_requests_fail_before_any_slice_runs_naming_the_problem(bundle, tmp_path):
    root, data = bundle
    prompts = tmp_path / "prompts.json"
    for content, message in [
        ({"case9.nii.gz": {"boxes": {"ring": [BOX]}}}, r"names \['case9.nii.gz'\], which are not among the volumes"),
        (["not", "an", "object"], "expected {image file name: request object}"),
    ]:
        prompts.write_text(json.dumps(content))
        with pytest.raises(Exception) as error:
            run_inference(root, data, prompts, tmp_path)
        assert re.search(message, messages(error.value)), messages(error.value)
        assert not (tmp_path / "out").exists(), "nothing is written before the request is read"
    labels = {"ring": 1, "blob": 2}
    with pytest.raises(ValueError, match="prompt for unknown label 'bone'"):
        parse_request({"boxes": {"bone": [BOX]}}, labels)
    with pytest.raises(ValueError, match=r"one prompt source.*got \['boxes', 'clicks'\]"):
        parse_request({"boxes": {"ring": [BOX]}, "blob": [[1, 2, 3]]}, labels)
    assert parse_request({"ring": [1, 2, 3]}, labels) == ("clicks", {1: [[1, 2, 3]]})


def test_prompts_for_a_model_that_takes_none_are_refused(tmp_path):
    root = tmp_path / "medsaga"
    shutil.copytree(REPO / "bundles" / "medsaga" / "configs", root / "configs")
    save_plain_model(SamSegmenter("lite_medsam_tiny", 2, checkpoint=None, image_size=SIZE), root / "models" / "model.pt")
    data = write_dataset(tmp_path / "data", n_training=1, n_test=1).parent
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"case0.nii.gz": {"boxes": {"grey matter": [BOX]}}}))
    folder = root / "configs"
    workflow = ConfigWorkflow(config_file=str(folder / "inference.json"), workflow_type="infer",
                              meta_file=str(folder / "metadata.json"), logging_file=False, bundle_root=str(root),
                              dataset_dir=str(data), prompts=str(prompts), **OVERRIDES)
    with pytest.raises(Exception) as error:
        workflow.initialize()
        workflow.run()
    assert "takes no prompts; volume requests need a box-prompted model" in messages(error.value)
    assert served_labels(root / "models" / "model.pt", folder / "metadata.json") == {"grey matter": 1, "white matter": 2}


@pytest.mark.parametrize("damage,message", [
    ("nan", r"NaN|non-finite|infinite"),
    ("truncated", "cannot be read"),
    ("4d", r"channel|4-D|dimensions|shape"),
])
def test_inference_refuses_what_training_refuses_naming_the_file(damage, message, bundle, tmp_path):
    root, data = bundle
    folder = tmp_path / "volumes"
    folder.mkdir()
    path = folder / "bad.nii.gz"
    image = np.random.default_rng(0).random((20, 16, 6)).astype(np.float32)
    if damage == "nan":
        image[0, 0, :3] = np.nan
    if damage == "4d":
        image = np.stack([image, image], axis=-1)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(path))
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    (folder / "dataset.json").write_text(json.dumps({"modality": {"0": "MRI"}, "test": ["bad.nii.gz"]}))
    config = root / "configs"
    workflow = ConfigWorkflow(config_file=[str(config / "inference.json"), str(config / "inference_boxes.json")],
                              workflow_type="infer",
                              meta_file=str(config / "metadata.json"), logging_file=False, bundle_root=str(root),
                              dataset_dir=str(folder), output_dir=str(tmp_path / "out"), **OVERRIDES)
    with pytest.raises(Exception) as error:
        workflow.initialize()
    assert "bad.nii.gz" in messages(error.value) and re.search(message, messages(error.value)), messages(error.value)
    assert not (tmp_path / "out").exists()


def test_your_own_classes_travel_with_the_model_to_inference_monai_label_and_the_zip(tmp_path):
    """Train box-mode medsaga on a dataset with three classes of its own, then serve it through
    run inference, the MONAI Label app and ``medsaga package`` without overriding num_classes or
    the labels: all read them from ``models/model.json``."""
    import subprocess
    import zipfile

    from bundle_runs import TINY_TRAINING, configs, run_bundle

    data = write_dataset(tmp_path / "data", n_training=2, n_validation=1, n_test=1).parent
    description = json.loads((data / "dataset.json").read_text())
    description["labels"]["3"] = "cyst"
    (data / "dataset.json").write_text(json.dumps(description))
    for label in data.glob("labels*/*.nii.gz"):
        image = nib.load(str(label))
        array = np.asarray(image.dataobj).copy()
        array[30:36, 20:28, 6:16] = 3
        nib.save(nib.Nifti1Image(array, image.affine), str(label))
    root = tmp_path / "bundles" / "medsaga"
    shutil.copytree(REPO / "bundles" / "medsaga", root, ignore=shutil.ignore_patterns("models", "eval", "data"))
    run_bundle("training", configs("medsaga", "train", "boxes"), "--bundle_root", str(root), "--dataset_dir", str(data),
               *TINY_TRAINING)
    info = json.loads((root / "models" / "model.json").read_text())
    assert info["class_names"] == ["ring", "blob", "cyst"] and info["prompt_kind"] == "mcp"

    run_bundle("inference", str([str(root / "configs" / "inference.json"), str(root / "configs" / "inference_boxes.json")]),
               "--bundle_root", str(root), "--dataset_dir", str(data), "--backbone", "lite_medsam_tiny",
               "--image_size", "64")
    assert (root / "eval" / "inference" / "case0_seg.nii.gz").is_file()
    served = discover_bundles(root.parent, OVERRIDES)["medsaga"]
    assert served.box_mode and served.labels == {"ring": 1, "blob": 2, "cyst": 3}
    medsaga = shutil.which("medsaga") or str(Path(sys.executable).parent / "medsaga")
    done = subprocess.run([medsaga, "package", "--bundle", str(root), "--out", str(tmp_path / "dist"), "--backbone",
                           "lite_medsam_tiny", "--image_size", "64"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    with zipfile.ZipFile(tmp_path / "dist" / "medsaga_v0.1.0.zip") as archive:
        metadata = json.loads(archive.read("medsaga/configs/metadata.json"))
        assert json.loads(archive.read("medsaga/models/model.json"))["class_names"] == ["ring", "blob", "cyst"]
        inference = json.loads(archive.read("medsaga/configs/inference.json"))
    assert inference["network_def"]["_target_"].endswith("TwoPassBoxSegmenter"), "the zip serves the box-mode model"
    output = metadata["network_data_format"]["outputs"]["pred"]
    assert output["channel_def"] == {"0": "background", "1": "ring", "2": "blob", "3": "cyst"}
    assert output["num_channels"] == 4
