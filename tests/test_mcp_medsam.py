"""mcp_medsam: modality-balanced sampling, the box / modality / content prompts, box-prompted and
box-free inference, and the bad inputs each refused with a clear error."""

import json

import pytest
import torch

from data_synthetic import write_dataset
from medsaga_components import SamSegmenter
from medsaga_components.data import SliceDataset, SliceRef
from medsaga_components.data.decathlon import case_modalities
from medsaga_components.modalities import MODALITIES, UndeclaredModalityError, modality_index
from medsaga_components.data.samplers import ModalityBalancedSampler, modality_balanced_loader
from medsaga_components.prompts.box_batches import McpPrepareBatch
from medsaga_components.prompts.from_labels import boxes_from_labels
from medsaga_components.evaluation.test_volumes import evaluate_box_prompted
from medsaga_components.inference.prompted import segment_slice_with_boxes
from medsaga_components.inference.two_pass import BoxFirstPass, TwoPassBoxSegmenter, two_pass_logits
from medsaga_components.methods import build_network
from medsaga_components.prompts.mcp import McpPrompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE = 64
BOXES = torch.tensor([[[4.0, 6.0, 40.0, 44.0], [20.0, 18.0, 60.0, 58.0]]])


def _network(**options) -> SamSegmenter:
    torch.manual_seed(0)
    net = build_network("mcp_medsam", "lite_medsam_tiny", num_classes=2, checkpoint=None, image_size=SIZE,
                        prompt_options=options).eval()
    # The content encoder's projection starts at zero (the dense prompt starts as LiteMedSAM's);
    # give it the non-zero weights training would, so that content can show in the output.
    with torch.no_grad():
        net.prompt.content_encoder.projection.weight.normal_(0.0, 0.5)
    return net


# --- modality-balanced sampling ------------------------------------------------------------

def test_each_modality_gets_its_share_over_an_epoch_whatever_its_number_of_cases():
    # 60 CT samples in 12 cases, 6 MRI samples in 2 cases, one ultrasound sample
    modalities = ["CT"] * 60 + ["MRI"] * 6 + ["US"]
    cases = [f"ct{i // 5}" for i in range(60)] + ["mr0"] * 2 + ["mr1"] * 4 + ["us0"]
    draws = 6000
    indices = list(ModalityBalancedSampler(modalities, draws, cases=cases, seed=3))
    assert len(indices) == draws
    sd = (draws * (1 / 3) * (2 / 3)) ** 0.5  # binomial standard deviation of one modality's count
    for modality in ("CT", "MRI", "US"):
        count = sum(modalities[i] == modality for i in indices)
        assert abs(count - draws / 3) < 4 * sd, (modality, count)
    # then a case uniformly: MRI's two cases get half of MRI's draws each, though one has twice the samples
    mri = [cases[i] for i in indices if modalities[i] == "MRI"]
    assert abs(mri.count("mr0") - len(mri) / 2) < 4 * (len(mri) / 4) ** 0.5
    # a shuffled epoch of the same data would have shown CT 60 / 67 of the time
    assert sum(modalities[i] == "CT" for i in indices) < 0.5 * draws


def test_sampler_continues_across_epochs_and_splits_one_sequence_across_processes():
    modalities = ["CT", "CT", "CT", "MRI"]
    sampler = ModalityBalancedSampler(modalities, 8, seed=0)
    assert list(sampler) != list(sampler)  # a new draw every epoch
    whole = list(ModalityBalancedSampler(modalities, 16, seed=5))
    ranks = [list(ModalityBalancedSampler(modalities, 8, seed=5, num_replicas=2, rank=r)) for r in (0, 1)]
    assert ranks[0] == whole[0::2] and ranks[1] == whole[1::2]


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory):
    """Four training volumes: three CT by default, one marked MRI in its own entry."""
    path = write_dataset(tmp_path_factory.mktemp("mixed"), n_training=4, modality="CT")
    raw = json.loads(path.read_text())
    raw["training"][3]["modality"] = "MR"  # an alias of MRI
    path.write_text(json.dumps(raw))
    return path


def test_per_case_modality_wins_over_the_datasets_and_feeds_the_loader_and_the_prompts(mixed_dataset):
    lookup = case_modalities(mixed_dataset)
    ct, mri = MODALITIES.index("CT"), MODALITIES.index("MRI")
    assert [lookup[f"imagesTr/case{i}.nii.gz"] for i in range(4)] == [ct, ct, ct, mri]
    refs = [SliceRef(f"imagesTr/case{i}.nii.gz", f"labelsTr/case{i}.nii.gz", 2, z) for i in range(4) for z in (6, 12)]
    dataset = SliceDataset(mixed_dataset, refs, image_size=SIZE)
    loader = modality_balanced_loader(dataset, str(mixed_dataset), batch_size=4, steps_per_epoch=100, seed=1)
    prepare = McpPrepareBatch(2, str(mixed_dataset), boxes="labels", jitter=0.05, whole_image_prob=0.3, seed=0)
    shown = []
    for batch in loader:
        shown += prepare.prompts(batch)["modality"].tolist()
    assert len(shown) == 400 and abs(shown.count(mri) - 200) < 4 * 10  # MRI: 1 volume of 4, half of the draws
    _, _, args, kwargs = prepare(batch)
    prompts = kwargs["prompts"]
    assert args == () and prompts["boxes"].shape == (4, 2, 4) and prompts["present"].dtype == torch.bool


def test_undeclared_modalities_are_refused_naming_the_case_or_the_prompt(mixed_dataset, tmp_path):
    raw = json.loads(mixed_dataset.read_text())
    raw["training"][1]["modality"] = "Sonar"
    broken = tmp_path / "dataset.json"
    broken.write_text(json.dumps(raw))
    with pytest.raises(UndeclaredModalityError, match=r"training\[1\].*case1.*'Sonar' is not declared"):
        case_modalities(broken)
    with pytest.raises(UndeclaredModalityError, match="'Sonar' is not declared; expected one of"):
        modality_index("Sonar")
    net = _network()
    with pytest.raises(ValueError, match="'Sonar' is not declared"):
        net(torch.rand(1, 1, SIZE, SIZE), {"boxes": BOXES, "modality": "Sonar"})
    with pytest.raises(ValueError, match="modality index 11 is not declared"):
        net(torch.rand(1, 1, SIZE, SIZE), {"boxes": BOXES, "modality": torch.tensor([11])})
    with pytest.raises(ValueError, match="'Sonar' is not declared"):
        TwoPassBoxSegmenter("lite_medsam_tiny", 2, checkpoint=None, image_size=SIZE, modality="Sonar")


# --- each prompt changes the output ---------------------------------------------------------

def test_a_changed_box_modality_or_content_changes_the_output():
    net = _network()
    image = torch.rand(1, 1, SIZE, SIZE)
    with torch.no_grad():
        base = net(image, {"boxes": BOXES, "modality": "MRI"})
        moved = net(image, {"boxes": BOXES + torch.tensor([6.0, 0.0, 2.0, 0.0]), "modality": "MRI"})
        ct = net(image, {"boxes": BOXES, "modality": "CT"})
        net.prompt.use_content.fill_(False)
        without_content = net(image, {"boxes": BOXES, "modality": "MRI"})
    for other, what in ((moved, "box"), (ct, "modality"), (without_content, "content")):
        assert (other - base).abs().max() > 1e-3, f"changing the {what} did not change the logits"


def test_content_comes_from_inside_each_box_only():
    prompt = _network().prompt
    encoder = _network().backbone.prompt_encoder
    image = torch.rand(1, 1, SIZE, SIZE)
    inside, outside = image.clone(), image.clone()
    inside[..., 20:30, 24:34] = 1.0 - inside[..., 20:30, 24:34]  # within both boxes
    outside[..., :, 62:] = 1.0 - outside[..., :, 62:]  # right of both boxes
    with torch.no_grad():
        dense = [prompt(encoder, 1, {"boxes": BOXES, "modality": "MRI", "image": x}).dense for x in (image, inside, outside)]
    assert (dense[1] - dense[0]).abs().max() > 1e-3
    torch.testing.assert_close(dense[2], dense[0])
    # and the content features sit on the box's cells of the embedding grid only
    # (class 1's box: x 4..40, y 6..44; the 16 x 16 grid's cell (i, j) is centred at 4 j + 1.5, 4 i + 1.5)
    grid = dense[0][0, 0] - encoder.no_mask_embed.weight.view(-1, 1, 1)
    cells = grid.abs().sum(0) > 0
    assert cells[5, 5] and cells[10, 9] and not cells[0, 0] and not cells[15, 15] and not cells[5, 12]


def test_switches_saved_with_the_weights_decide_at_inference():
    trained_without = _network(modality_prompt=False, content_prompt=False)
    served = TwoPassBoxSegmenter("lite_medsam_tiny", 2, checkpoint=None, image_size=SIZE).eval()
    served.load_state_dict(trained_without.state_dict(), strict=True)
    assert not bool(served.prompt.use_modality) and not bool(served.prompt.use_content)
    image = torch.rand(1, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(served(image, {"boxes": BOXES, "modality": "MRI"}),
                                   served(image, {"boxes": BOXES, "modality": "CT"}))


def test_default_modality_is_saved_and_used_when_a_call_gives_none():
    net = _network(default_modality="CT")
    served = TwoPassBoxSegmenter("lite_medsam_tiny", 2, checkpoint=None, image_size=SIZE).eval()
    served.load_state_dict(net.state_dict(), strict=True)
    image = torch.rand(1, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(served(image, {"boxes": BOXES}), served(image, {"boxes": BOXES, "modality": "CT"}))


# --- inference from boxes, and without -------------------------------------------------------

def test_box_prompted_inference_without_boxes_is_an_error_naming_them():
    net = _network()
    image = torch.rand(1, 1, SIZE, SIZE)
    with pytest.raises(ValueError, match=r"needs prompt keys \['boxes'\].*TwoPassBoxSegmenter"):
        net(image, {"modality": "MRI"})
    with pytest.raises(ValueError, match="needs at least one box"):
        segment_slice_with_boxes(net, torch.rand(40, 50), {1: None, 2: None})


def test_a_box_outside_the_image_is_an_error_naming_it():
    net = _network()
    with pytest.raises(ValueError, match=r"box \[4.0, 6.0, 70.0, 44.0\] at prompts\['boxes'\]\[0, 0\] \(class 1\) "
                                         r"lies outside the 64 x 64 image"):
        net(torch.rand(1, 1, SIZE, SIZE), {"boxes": BOXES.clone().index_fill_(-1, torch.tensor([2]), 70.0)[:, :1]
                                           .repeat(1, 2, 1), "modality": "MRI"})
    with pytest.raises(ValueError, match="x1 < x0"):
        net(torch.rand(1, 1, SIZE, SIZE), {"boxes": BOXES[..., [2, 1, 0, 3]], "modality": "MRI"})
    with pytest.raises(ValueError, match=r"class '2' is not inside the 50 x 40 slice"):
        segment_slice_with_boxes(net, torch.rand(40, 50), {1: (2, 2, 20, 20), "2": (10, 10, 30, 41)})
    # an absent class's placeholder box is not checked
    with torch.no_grad():
        out = net(torch.rand(1, 1, SIZE, SIZE), {"boxes": torch.tensor([[[0.0, 0, 20, 20], [-5, -5, 99, 99]]]),
                                                 "present": torch.tensor([[True, False]]), "modality": "MRI"})
    assert (out[:, 2] < -1e3).all()


def test_user_boxes_on_a_slice_map_into_the_square_frame_and_back():
    net = _network()
    served = TwoPassBoxSegmenter("lite_medsam_tiny", 2, checkpoint=None, image_size=SIZE).eval()
    served.load_state_dict(net.state_dict(), strict=True)
    slice_ = torch.rand(32, 64)  # fitted into the top half of the 64 x 64 square, scale 1
    labels, logits = segment_slice_with_boxes(served, slice_, {"ring": (4, 2, 40, 30)}, class_names=["ring", "blob"],
                                              modality="MRI")
    assert labels.shape == (32, 64) and logits.shape == (3, 32, 64)
    assert not (labels == 2).any(), "a class without a box is not segmented"
    square = torch.zeros(1, 1, SIZE, SIZE)
    square[..., :32, :] = slice_
    with torch.no_grad():
        direct = net(square, {"boxes": torch.tensor([[[4.0, 2, 40, 30], [0, 0, 0, 0]]]),
                              "present": torch.tensor([[True, False]]), "modality": "MRI"})
    torch.testing.assert_close(logits[1], direct[0, 1, :32], atol=1e-4, rtol=1e-4)


def test_box_free_inference_asks_the_whole_image_then_the_boxes_of_its_first_prediction():
    calls = []

    def forward(image, prompts):  # class 1 where x in 10..29 and y in 5..24; class 2 nowhere
        calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in prompts.items()})
        logits = torch.full((1, 3, SIZE, SIZE), -5.0)
        logits[:, 0] = 0.0
        logits[:, 1, 5:25, 10:30] = 5.0
        return logits

    two_pass_logits(forward, torch.rand(1, 1, SIZE, SIZE), num_classes=2, image_size=SIZE, first_pass=BoxFirstPass(),
                    prompts={"modality": "CT"})
    first, second = calls
    torch.testing.assert_close(first["boxes"], torch.tensor([[[0.0, 0, 63, 63]] * 2]))
    torch.testing.assert_close(second["boxes"][0, 0], torch.tensor([10.0, 5, 29, 24]))
    assert second["present"].tolist() == [[True, False]] and first["modality"] == second["modality"] == "CT"


def test_two_pass_network_loads_the_plain_weights_and_needs_no_prompts():
    net = _network(default_modality="MRI")
    served = TwoPassBoxSegmenter("lite_medsam_tiny", 2, checkpoint=None, image_size=SIZE).eval()
    served.load_state_dict(net.state_dict(), strict=True)
    image = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        out = served(image)
        first = net(image, {"boxes": torch.tensor([[[0.0, 0, 63, 63]] * 2] * 2)})
        boxes, present = boxes_from_labels(first.argmax(dim=1, keepdim=True), 2)
        second = net(image, {"boxes": boxes, "present": present})
        boxed = served(image, {"boxes": BOXES.repeat(2, 1, 1)})
    assert out.shape == (2, 3, SIZE, SIZE) and torch.isfinite(out).all()
    torch.testing.assert_close(out, second)
    torch.testing.assert_close(boxed, net(image, {"boxes": BOXES.repeat(2, 1, 1)}))


@pytest.mark.parametrize("boxes", ["box_free", "ground_truth", "first_pass"])
def test_test_evaluation_scores_every_box_source_with_each_cases_modality(boxes, mixed_dataset, tmp_path):
    refs = [SliceRef("imagesTr/case3.nii.gz", "labelsTr/case3.nii.gz", 2, z) for z in range(6, 10)]
    dataset = SliceDataset(mixed_dataset, refs, image_size=SIZE)
    summary = evaluate_box_prompted(_network(), dataset, tmp_path, boxes=boxes, test_time_flips=boxes != "ground_truth")
    assert 0.0 <= summary["mean_dice"] <= 1.0 and (tmp_path / "evaluation.json").is_file()
    with pytest.raises(ValueError, match="boxes must be one of"):
        evaluate_box_prompted(_network(), dataset, tmp_path, boxes="user")
