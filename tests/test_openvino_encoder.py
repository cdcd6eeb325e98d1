"""The image encoder run by OpenVINO: the same answer as PyTorch on real weights and a real slice,
compiled from the weights it has when first called (and again when they change), never in a
pass that needs gradients or in training mode, switched by the bundles' ``openvino`` key, and
used by ``run inference`` and, when asked, by training's validations and test evaluation.

OpenVINO is installed by scripts/setup_env.sh (the ``openvino`` extra); these tests fail, not
skip, where it is missing."""

import copy
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from bundle_runs import REPO, TINY_TRAINING, configs, run_bundle
from data_synthetic import write_dataset
from medsaga_components import SamSegmenter
from medsaga_components.backbones import build_backbone
from medsaga_components.inference.openvino_encoder import (
    OpenVinoEncoder,
    encoder_runtime,
    resolve_openvino,
    same_encoder_runtime,
    use_openvino,
    uses_openvino,
)
from medsaga_components.precision import use_bf16, uses_bf16
from test_inference_path import _network
from test_pretrained_lite_medsam import _to_network_frame, _whole_brain_slice


def _encoder_patch(network) -> OpenVinoEncoder:
    patch = network.backbone.image_encoder.__dict__.get("forward")
    assert isinstance(patch, OpenVinoEncoder)
    return patch


def test_pretrained_lite_medsam_answers_a_box_on_a_real_slice_as_pytorch_does(mni_files):
    backbone = build_backbone("lite_medsam", checkpoint="pretrained").eval()
    image, tissue = _whole_brain_slice(mni_files)
    x = torch.cat([_to_network_frame(image), _to_network_frame(image[::-1].copy())])  # two slices: a batch of 2
    mask = _to_network_frame(tissue.astype(np.float32))[0, 0] > 0.5
    ys, xs = torch.nonzero(mask, as_tuple=True)
    boxes = torch.tensor([[xs.min(), ys.min(), xs.max(), ys.max()]] * 2, dtype=torch.float32)
    with torch.no_grad():
        embeddings = backbone.embed_images(x)
        reference = backbone.predict_with_boxes(x, boxes)

    network = torch.nn.Module()
    network.backbone = backbone  # use_openvino finds backbone.image_encoder, as in a SamSegmenter
    use_openvino(network, True)
    with torch.no_grad():
        compiled = backbone.embed_images(x)
        answered = backbone.predict_with_boxes(x, boxes)
    assert compiled.shape == embeddings.shape == (2, 256, 64, 64) and compiled.dtype == torch.float32
    assert (compiled - embeddings).abs().max() < 1e-3 * embeddings.abs().max()
    assert ((answered > 0) == (reference > 0)).float().mean() > 0.999
    dice = 2 * ((answered[0, 0] > 0) & mask).sum() / ((answered[0, 0] > 0).sum() + mask.sum())
    assert dice > 0.7  # the comparison is on a real segmentation, not on two empty masks
    assert _encoder_patch(network).compilations == 1  # compiled once, for both calls and any batch


def _tiny_network(seed: int) -> SamSegmenter:
    torch.manual_seed(seed)
    return SamSegmenter("lite_medsam_tiny", 2, checkpoint=None, image_size=64).eval()


def test_compiled_from_the_weights_it_has_when_called_and_again_when_they_change(one_torch_thread):
    network = use_openvino(_tiny_network(0), True)  # before any weights are loaded, as a bundle builds it
    other = _tiny_network(1)
    network.load_state_dict(other.state_dict())  # what CheckpointLoader does after the network is built
    images = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(network(images), other(images), atol=1e-3, rtol=1e-3)
        assert _encoder_patch(network).compilations == 1
        network.load_state_dict(_tiny_network(2).state_dict())
        torch.testing.assert_close(network(images), _tiny_network(2)(images), atol=1e-3, rtol=1e-3)
    assert _encoder_patch(network).compilations == 2


def test_a_copy_of_the_network_compiles_its_own(one_torch_thread):
    network = use_openvino(_tiny_network(0), True)
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        network(images)
        duplicate = copy.deepcopy(network)  # what saving the best model does during training
        duplicate.backbone.image_encoder.neck[0].weight.mul_(0.5)
        embedded = network.backbone.embed_images(images)
        torch.testing.assert_close(embedded, _tiny_network(0).backbone.embed_images(images), atol=1e-3, rtol=1e-3)
        assert not torch.allclose(duplicate.backbone.embed_images(images), embedded, atol=1e-3)
    assert _encoder_patch(duplicate).module is duplicate.backbone.image_encoder
    assert _encoder_patch(duplicate).compilations == 2 and _encoder_patch(network).compilations == 1


def test_a_pass_that_needs_gradients_or_runs_in_training_mode_runs_pytorch(one_torch_thread):
    network = use_openvino(_tiny_network(0), True)
    logits = network(torch.rand(2, 1, 64, 64))
    logits.sum().backward()
    encoder_weights = list(network.backbone.image_encoder.parameters())
    assert all(p.grad is not None for p in encoder_weights)
    network.train()
    with torch.no_grad():  # a frozen encoder in training mode: its batch norms use the batch's statistics
        network(torch.rand(2, 1, 64, 64))
    assert _encoder_patch(network).compilations == 0
    network.eval()
    with torch.no_grad():
        network(torch.rand(2, 1, 64, 64))
    assert _encoder_patch(network).compilations == 1 and not network.backbone.image_encoder.training


def test_the_bundle_key_and_the_precision():
    assert resolve_openvino("auto", "cpu") and resolve_openvino(None, "cpu") and resolve_openvino("true", "cpu")
    assert not resolve_openvino("auto", "cuda") and not resolve_openvino(False, "cpu")
    with pytest.raises(ValueError, match="openvino is true but the network is on cuda"):
        resolve_openvino(True, "cuda")
    with pytest.raises(ValueError, match="openvino"):
        resolve_openvino("fast", "cpu")

    network = use_openvino(use_bf16(_tiny_network(0), True), "auto")  # as the bundle configs write it
    assert uses_openvino(network) and _encoder_patch(network).bf16
    assert encoder_runtime(network) == "OpenVINO bf16"
    guide = same_encoder_runtime(_tiny_network(1), network)  # a propagation guide follows the served model
    assert encoder_runtime(guide) == "OpenVINO bf16"
    use_openvino(network, False)  # off: the bf16 autocast it sat on is back
    assert not uses_openvino(network) and uses_bf16(network) and encoder_runtime(network) == "PyTorch bf16 autocast"
    assert encoder_runtime(use_openvino(_tiny_network(0), True)) == "OpenVINO float32"


def test_run_inference_uses_it_by_default_with_the_label_map_of_pytorch(tmp_path):
    dataset_dir = tmp_path / "data"
    write_dataset(dataset_dir, n_training=1, n_test=1)  # test volume: 40 x 32 x 24, labelled
    (tmp_path / "models").mkdir()
    torch.save(_network("medsaga").state_dict(), tmp_path / "models" / "model.pt")  # random, every class somewhere
    folder = REPO / "bundles" / "medsaga" / "configs"
    label_maps, networks = {}, {}
    for openvino in ("auto", False):
        overrides = {"bundle_root": str(tmp_path), "dataset_dir": str(dataset_dir), "image_size": 64,
                     "backbone": "lite_medsam_tiny", "output_dir": str(tmp_path / f"out_{openvino}"), "openvino": openvino,
                     "keep_freed_cpu_memory": False}
        workflow = ConfigWorkflow(config_file=str(folder / "inference.json"), workflow_type="infer",
                                  meta_file=str(folder / "metadata.json"), **overrides)
        workflow.initialize()
        workflow.run()
        networks[openvino] = workflow.parser.get_parsed_content("network")
        (written,) = (tmp_path / f"out_{openvino}").glob("*_seg.nii.gz")
        label_maps[openvino] = np.asarray(nib.load(written).dataobj)
    assert encoder_runtime(networks["auto"]) == "OpenVINO float32" and _encoder_patch(networks["auto"]).compilations == 1
    assert encoder_runtime(networks[False]) == "PyTorch float32"
    assert label_maps["auto"].shape == (40, 32, 24) and len(np.unique(label_maps[False])) > 1
    assert (label_maps["auto"] == label_maps[False]).mean() > 0.999
    assert json.loads((folder / "inference.json").read_text())["openvino"] == "auto"


def test_training_with_it_validates_and_evaluates_through_it(demo_dir, tmp_path):
    """Off by default in train.json (it raised a training run's peak RSS); ``--openvino true`` turns it on
    for the validations and the test evaluation, while the steps stay in PyTorch."""
    assert json.loads((REPO / "bundles" / "medsaga" / "configs" / "train.json").read_text())["openvino"] is False
    done = run_bundle("training", configs("medsaga", "train"), "--bundle_root", str(tmp_path), "--dataset_dir",
                      str(demo_dir), *TINY_TRAINING, "--openvino", "true")
    log = done.stdout + done.stderr
    assert "image encoder runtime: OpenVINO float32 (openvino=true)" in log
    assert log.count("image encoder compiled by OpenVINO") >= 3  # two validations and the test evaluation
    assert "val_mean_dice" in log and (tmp_path / "models" / "model.pt").is_file()
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["volumes"]
