"""The MONAI Label app (monailabel_app/), against the real program: MONAI Label 0.8.5 installed
into its own environment by scripts/install_monailabel.sh (several minutes on a bare machine,
a no-op afterwards), ``monailabel start_server`` on 127.0.0.1, a NIfTI volume uploaded, infer,
a saved label, training through the API, prompted segmentation, 20 concurrent requests.

The prompt-slicing tests at the top run in the project's own environment with real networks."""

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle_runs import REPO, TINY_TRAINING, run_bundle
from medsaga_components import SamSegmenter
from medsaga_components.data.square_resize import fit_to_square, square_logits_to_slice
from medsaga_components.adapters.export import save_plain_model
from medsaga_components.inference.model import write_model_info
from medsaga_components.inference.two_pass import TwoPassBoxSegmenter

sys.path.insert(0, str(REPO / "monailabel_app"))
from benchmark_infer import concurrent_infers  # noqa: E402
from client import LabelServerError  # noqa: E402
from harness import LabelServer, monailabel_python  # noqa: E402
from medsaga_label.bundles import discover_bundles  # noqa: E402
from medsaga_components.inference.prompted import PromptedSliceInferer, prompt_tensors, prompts_from_request  # noqa: E402
from medsaga_components.network import ABSENT_CLASS_LOGIT as NOT_ASKED  # noqa: E402

# The served models' settings: TINY_TRAINING's backbone and size; training runs of seconds.
_tiny = dict(zip(TINY_TRAINING[::2], TINY_TRAINING[1::2]))
OVERRIDES = {"backbone": _tiny["--backbone"], "image_size": int(_tiny["--image_size"]), "checkpoint": None}
TRAIN_OVERRIDES = {k[2:]: int(v) for k, v in _tiny.items() if k[2:] not in OVERRIDES}
LABELS = {"grey matter": 1, "white matter": 2}


def varied_network(prompt):
    """A tiny network whose class read-out is not all zero, so label maps are not constant."""
    network = SamSegmenter("lite_medsam_tiny", 2, checkpoint=None, image_size=64, prompt=prompt).eval()
    with torch.no_grad():
        for mlp in network.backbone.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.normal_(0, 0.5)
    return network


# --- prompts, in the project's environment ------------------------------------------------

def test_prompts_map_voxels_to_slices_and_sam_coordinates():
    points = PromptedSliceInferer(64, axis=2, prompt_input="points", num_classes=2)
    # [i, j, k]: slice k; SAM's (x, y) = (column j, row i)
    assert points.slices_of({1: [[5, 7, 3]], 2: [[1, 2, 3], [4, 4, 0]]}, (10, 12, 6)) == {
        3: {1: [(7.0, 5.0)], 2: [(2.0, 1.0)]}, 0: {2: [(4.0, 4.0)]}}
    boxes = PromptedSliceInferer(64, axis=0, prompt_input="boxes", num_classes=2)
    # along axis 0 a slice has rows j and columns k; a box spans every slice i0..i1
    assert boxes.slices_of({2: [3, 1, 2, 1, 5, 4]}, (10, 12, 6)) == {s: {2: [(2.0, 1.0, 4.0, 5.0)]} for s in (1, 2, 3)}
    # a list of boxes: one per structure of the class, all of them on each slice they span
    assert boxes.slices_of({2: [[3, 1, 2, 1, 5, 4], [1, 8, 0, 1, 9, 1]]}, (10, 12, 6)) == {
        1: {2: [(2.0, 1.0, 4.0, 5.0), (0.0, 8.0, 1.0, 9.0)]}, 2: {2: [(2.0, 1.0, 4.0, 5.0)]}, 3: {2: [(2.0, 1.0, 4.0, 5.0)]}}
    two = prompt_tensors({1: [(2.0, 1.0, 4.0, 5.0), (0.0, 8.0, 1.0, 9.0)]}, "boxes", 2, 64)
    assert two["boxes"].shape == (1, 2, 2, 4) and two["present"].tolist() == [[[False, False], [True, True]]]
    assert two["boxes"][0, 1].tolist() == [[2.0, 1.0, 4.0, 5.0], [0.0, 8.0, 1.0, 9.0]]
    with pytest.raises(ValueError, match="outside the volume"):
        points.slices_of({1: [[10, 0, 0]]}, (10, 12, 6))
    with pytest.raises(ValueError, match="classes are 1..2"):
        points.slices_of({3: [[0, 0, 0]]}, (10, 12, 6))
    assert prompts_from_request({"boxes": {"white matter": [0, 0, 0, 1, 1, 1]}}, LABELS, "boxes") == {2: [0, 0, 0, 1, 1, 1]}
    assert prompts_from_request({"grey matter": [[1, 2, 3]], "white matter": []}, LABELS, "points") == {1: [[1, 2, 3]]}
    with pytest.raises(ValueError, match="unknown label 'bone'"):
        prompts_from_request({"boxes": {"bone": [0, 0, 0, 1, 1, 1]}}, LABELS, "boxes")


def save_trained(network, path):
    save_plain_model(network, path)
    write_model_info(network, path)


def test_a_model_trained_with_boxes_json_is_served_box_prompted(tmp_path):
    """What training recorded beside the weights decides (``models/model.json``, written by the
    same calls as ``SaveBestPlainModel``): medsaga's model from configs/boxes.json is served
    through inference_boxes.json and takes boxes; a prompt-free one keeps the plain inference.json."""
    root = tmp_path / "medsaga"
    shutil.copytree(REPO / "bundles" / "medsaga" / "configs", root / "configs")
    (root / "models").mkdir()
    overrides = {"backbone": "lite_medsam_tiny", "image_size": 64}
    save_trained(SamSegmenter("lite_medsam_tiny", 2, checkpoint=None, image_size=64), root / "models" / "model.pt")
    plain = discover_bundles(tmp_path, overrides)["medsaga"]
    assert not plain.box_mode and plain.prompt_input is None
    assert type(plain.build_network()).__name__ == "SamSegmenter"
    boxed = TwoPassBoxSegmenter("lite_medsam_tiny", 2, checkpoint=None, image_size=64, modality_prompt=False,
                                content_prompt=False)
    save_trained(boxed, root / "models" / "model.pt")
    served = discover_bundles(tmp_path, overrides)["medsaga"]
    assert served.box_mode and served.prompt_kind == "mcp" and served.prompt_input == "boxes"
    network = served.build_network()
    network.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True), strict=True)
    assert isinstance(network, TwoPassBoxSegmenter)


@pytest.mark.parametrize("prompt_input", ["boxes", "points"])
def test_prompted_inferer_segments_only_prompted_slices_and_classes(prompt_input, one_torch_thread):
    """A real network built with the prompt kind: unprompted slices stay background, an
    unprompted class is never predicted, and a prompted slice gets the network's own answer
    to the prompt scaled into its square frame."""
    torch.manual_seed(0)
    network = varied_network(prompt_input)
    volume = torch.rand(1, 1, 40, 30, 5)
    inferer = PromptedSliceInferer(64, axis=2, prompt_input=prompt_input, num_classes=2)
    if prompt_input == "boxes":
        prompts, asked_slices = {1: [4, 3, 1, 30, 25, 2]}, [1, 2]
        # 40 x 30 slice -> 64 x 48 in the square frame: (x, y) scale (48/30, 64/40)
        framed = {"boxes": torch.tensor([[[(3 + .5) * 1.6 - .5, (4 + .5) * 1.6 - .5, (25 + .5) * 1.6 - .5,
                                           (30 + .5) * 1.6 - .5], [0, 0, 63, 63]]]),
                  "present": torch.tensor([[True, False]])}
    else:
        prompts, asked_slices = {1: [[10, 20, 3]]}, [3]
        framed = {"points": torch.tensor([[[[(20 + .5) * 1.6 - .5, (10 + .5) * 1.6 - .5]], [[0.0, 0.0]]]]),
                  "point_labels": torch.tensor([[[1], [-1]]]), "present": torch.tensor([[True, False]])}
    with torch.no_grad():
        logits = inferer(volume, network, prompts)
        s = asked_slices[-1]
        squares, geometry = fit_to_square(volume[..., s], 64)
        expected = square_logits_to_slice(network(squares, framed), geometry)
    assert logits.shape == (1, 3, 40, 30, 5)
    torch.testing.assert_close(logits[..., s], expected, atol=1e-4, rtol=1e-4)
    labels = logits.argmax(1)
    for k in range(5):
        if k not in asked_slices:
            assert (labels[..., k] == 0).all() and (logits[:, 1:, ..., k] == NOT_ASKED).all()
    assert (logits[:, 2] < NOT_ASKED / 2).all()  # white matter was never asked (resizing blurs -1e4 slightly)
    assert set(labels.unique().tolist()) == {0, 1}


# --- the real server ----------------------------------------------------------------------

def write_case(folder: Path) -> tuple[Path, Path]:
    """A small volume with two labelled blocks (values 1, 2) and a non-trivial affine."""
    rng = np.random.default_rng(0)
    image = (rng.random((48, 40, 8)) * 100).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[8:24, 6:30] = 1
    label[24:40, 6:30] = 2
    image[label == 1] += 200
    image[label == 2] += 400
    affine = np.diag([1.5, 1.2, 3.0, 1.0])
    affine[:3, 3] = [-30, 12, 5]
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), folder / "case_0.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / "case_0_label.nii.gz")
    return folder / "case_0.nii.gz", folder / "case_0_label.nii.gz"


def as_image(payload: bytes):
    path = Path(tempfile.mkdtemp()) / "label.nii.gz"
    path.write_bytes(payload)
    return nib.load(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app on a free port of 127.0.0.1, serving a copy of every bundle's configs (so that
    training writes models there, not into the repository)."""
    python = monailabel_python()
    work = tmp_path_factory.mktemp("monailabel")
    for configs in sorted((REPO / "bundles").glob("*/configs")):
        shutil.copytree(configs, work / "bundles" / configs.parent.name / "configs")
    image, label = write_case(work / "data")
    (work / "studies").mkdir()
    server = LabelServer(python, work / "studies", work / "bundles", work / "server.log",
                         conf={"overrides": OVERRIDES, "train_overrides": TRAIN_OVERRIDES})
    try:
        server.wait_until_up(600)
        yield server, work, image, label
    finally:
        assert server.stop() is not None
        print((work / "server.log").read_text()[-3000:])


@pytest.mark.slow
def test_serves_every_bundle_and_asks_to_train_first(served):
    server, work, image, _ = served
    bundles = discover_bundles(REPO / "bundles")
    info = server.client.info()
    assert set(info["trainers"]) == set(bundles)
    prompted = {f"{n}_prompted" for n, b in bundles.items() if b.prompt_input}
    assert set(info["models"]) == set(bundles) | prompted
    for name, bundle in bundles.items():
        assert info["models"][name]["labels"] == bundle.labels == LABELS
    assert server.client.upload_image("case_0", image) == {"image": "case_0"}
    with pytest.raises(LabelServerError) as error:
        server.client.infer("medsaga", "case_0")
    assert error.value.status == 409 and "no trained model yet" in error.value.body and "train it first" in error.value.body


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_training_from_a_saved_label_and_infer_with_the_new_model(served):
    server, work, image, label = served
    client = server.client
    model = work / "bundles" / "medsaga" / "models" / "model.pt"
    source = nib.load(image)
    assert client.save_label("case_0", label)["label"] == "case_0"

    client.train("medsaga")
    task = client.wait_for_training(900)
    assert task["status"] == "DONE", task
    assert model.is_file()
    first_model = sha256(model)
    served_label = as_image(client.infer("medsaga", "case_0")[0])
    assert served_label.shape == source.shape
    np.testing.assert_allclose(served_label.affine, source.affine, atol=1e-5)
    assert set(np.unique(np.asarray(served_label.dataobj)).tolist()) <= {0, *LABELS.values()}

    # A second training fine-tunes that model; the next request must use the new file.
    client.train("medsaga", {"epochs": 1})
    task = client.wait_for_training(900)
    assert task["status"] == "DONE", task
    assert sha256(model) != first_model
    stats = json.loads((work / "studies" / ".medsaga_training" / "medsaga" / "last_run.json").read_text())
    assert stats["returncode"] == 0 and stats["images"] == 1
    served_label = np.asarray(as_image(client.infer("medsaga", "case_0")[0]).dataobj)
    # The same model file through the bundle's own `run inference` gives the same label map.
    run_bundle("inference", str(work / "bundles" / "medsaga" / "configs" / "inference.json"), "--bundle_root",
               str(work / "bundles" / "medsaga"), "--dataset_dir", str(_image_only(image)),
               "--backbone", OVERRIDES["backbone"], "--image_size", str(OVERRIDES["image_size"]))
    local = nib.load(work / "bundles" / "medsaga" / "eval" / "inference" / "case_0_seg.nii.gz")
    np.testing.assert_array_equal(served_label, np.asarray(local.dataobj))


def _image_only(image: Path) -> Path:
    folder = image.parent / "image_only"
    folder.mkdir(exist_ok=True)
    shutil.copy(image, folder / image.name)
    return folder


@pytest.mark.slow
def test_prompted_segmentation_with_points_and_boxes(served):
    """Each bundle whose method takes a user's points or boxes, with an untrained network of
    its own network_def as its model: only the prompted slices and classes are labelled."""
    server, work, image, _ = served
    bundles = {n: b for n, b in discover_bundles(work / "bundles", OVERRIDES).items() if b.prompt_input}
    if not bundles:
        pytest.skip("no bundle in bundles/ takes points or boxes")
    for name, bundle in bundles.items():
        torch.manual_seed(0)
        bundle.model_path.parent.mkdir(exist_ok=True)
        torch.save(bundle.build_network().state_dict(), bundle.model_path)
        if bundle.prompt_input == "boxes":
            params, slices = {"boxes": {"grey matter": [8, 6, 2, 23, 29, 4]}}, {2, 3, 4}
        else:
            params, slices = {"grey matter": [[15, 18, 3]], "white matter": [[30, 18, 3]]}, {3}
        labels = np.asarray(as_image(server.client.infer(f"{name}_prompted", "case_0", params)[0]).dataobj)
        assert labels.shape == (48, 40, 8)
        touched = {k for k in range(labels.shape[2]) if labels[..., k].any()}
        assert touched and touched <= slices, (name, touched)
        asked = {LABELS[n] for n in (params.get("boxes") or params)}
        assert set(np.unique(labels).tolist()) <= {0} | asked
        if bundle.prompt_input == "boxes":  # a label sent with the request: its slices completed, kept as drawn
            drawn = np.zeros((48, 40, 8), np.uint8)
            drawn[10:20, 8:16, 3], drawn[30:36, 20:30, 3] = 1, 2
            partial = work / "partial_label.nii.gz"
            nib.save(nib.Nifti1Image(drawn, np.eye(4)), str(partial))
            completed = np.asarray(as_image(server.client.infer(f"{name}_prompted", "case_0", {}, label=partial)[0])
                                   .dataobj)
            np.testing.assert_array_equal(completed[..., 3], drawn[..., 3])
        with pytest.raises(LabelServerError) as error:
            server.client.infer(f"{name}_prompted", "case_0", {"boxes": {"grey matter": [0, 0, 0, 99, 1, 1]}}
                                if bundle.prompt_input == "boxes" else {"grey matter": [[99, 1, 1]]})
        assert error.value.status == 422 and "outside the volume" in error.value.body


@pytest.mark.slow
def test_twenty_concurrent_requests_all_answered_correctly(served):
    server, work, _, _ = served
    assert (work / "bundles" / "medsaga" / "models" / "model.pt").is_file(), "runs after the training test"
    reference = np.asarray(as_image(server.client.infer("medsaga", "case_0")[0]).dataobj)
    answers, figures = concurrent_infers(server.client, "medsaga", "case_0", requests=20, workers=20)
    assert len(answers) == 20 and figures["errors"] == 0
    for payload in answers:
        np.testing.assert_array_equal(np.asarray(as_image(payload).dataobj), reference)
