"""Whole volumes from a user's prompts (``inference/volume.py``) with a real box-prompted network:
a tiny random LiteMedSAM whose read-out answers every box with "inside" (so propagation runs to
the box's ends), and counting of encoder passes."""

import numpy as np
import pytest
import torch

from medsaga_components import SamSegmenter
from medsaga_components.inference.volume import (
    SliceEmbeddings,
    box_around_structure,
    segment_volume_from_boxes,
    segment_volume_from_clicks,
    segment_volume_from_labelled_slices,
)

SIZE = 64


@pytest.fixture(scope="module")
def network():
    """Box-prompted, every class answering "foreground" everywhere: only the prompts and the
    clamping to the user's box decide where a class ends up."""
    torch.manual_seed(0)
    net = SamSegmenter("lite_medsam_tiny", 2, checkpoint=None, image_size=SIZE, prompt="boxes").eval()
    with torch.no_grad():
        for mlp in net.backbone.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.fill_(1.0)
    return net


def volume(shape=(40, 30, 12)):
    torch.manual_seed(1)
    return torch.rand(1, *shape)


def test_a_3d_box_never_yields_a_voxel_outside_it_and_encodes_each_slice_once(network):
    image = volume()
    box = [5, 4, 3, 20, 18, 8]
    slices = SliceEmbeddings(network, image, axis=2)
    labels = segment_volume_from_boxes(network, image, 2, {1: [box]}, slices=slices)
    assert labels.shape == (40, 30, 12) and labels.dtype == np.uint8
    inside = np.zeros(labels.shape, bool)
    inside[5:21, 4:19, 3:9] = True
    assert (labels[~inside] == 0).all(), "a voxel outside the user's box"
    assert (labels[inside] == 1).any() and not (labels == 2).any()
    # the prompts reached slices 3..8: each encoded exactly once, whatever the decoder calls
    assert slices.encoded == list(range(3, 9)) and slices.decoder_calls >= 6
    again = segment_volume_from_boxes(network, image, 2, {1: [box]}, slices=slices)
    assert slices.encoded == list(range(3, 9)) and np.array_equal(again, labels)


def test_boxes_along_another_axis_and_two_structures_of_a_class(network):
    image = volume((12, 40, 30))
    boxes = {2: [[2, 5, 4, 6, 15, 12], [3, 25, 14, 9, 35, 26]]}
    labels = segment_volume_from_boxes(network, image, 0, boxes)
    allowed = np.zeros(labels.shape, bool)
    allowed[2:7, 5:16, 4:13] = allowed[3:10, 25:36, 14:27] = True
    assert (labels[~allowed] == 0).all() and (labels[allowed] == 2).any()
    assert (labels[3:10, 25:36, 14:27] == 2).any(), "the second structure is segmented too"


def test_labelled_slices_come_back_exactly_as_drawn(network):
    image = volume()
    label = np.zeros((40, 30, 12), np.int64)
    label[10:20, 5:15, 4] = 1
    label[12:14, 20:28, 4] = 2
    label[8:18, 6:12, 9] = 1  # slice 9: class 2 absent there (labelled empty)
    out = segment_volume_from_labelled_slices(network, torch.as_tensor(image), 2, label)
    assert np.array_equal(out[..., 4], label[..., 4]) and np.array_equal(out[..., 9], label[..., 9])
    assert (out[..., 5:9] == 1).any(), "class 1 propagates between its labelled slices"
    assert not (out[..., 9:] == 2).any(), "class 2 does not cross the slice labelled without it"


def test_a_class_absent_from_the_next_labelled_slice_ends_midway_towards_it(network):
    # This network never stops by itself; each class ends where copying the nearest labelled slice would.
    label = np.zeros((40, 30, 12), np.int64)
    label[12:14, 20:28, 4] = 2
    label[8:18, 6:12, 9] = 1
    out = segment_volume_from_labelled_slices(network, volume(), 2, label)
    holds = [sorted(set(np.unique(out[..., k]).tolist()) - {0}) for k in range(12)]
    assert holds[5:9] == [[2], [2], [1], [1]]
    assert holds[:4] == [[2]] * 4 and holds[10:] == [[1]] * 2, "beyond the outermost labelled slices: the stop rule"


def test_a_guide_propagates_and_the_network_only_segments_what_the_guide_found(network):
    # The network answers "inside" everywhere; a guide that finds nothing anywhere leaves nothing for
    # it to segment, from a 3-D box, labelled slices (kept as drawn) or a click alike.
    blind = SamSegmenter("lite_medsam_tiny", 2, checkpoint=None, image_size=SIZE, prompt="boxes").eval()
    decode = blind.backbone.decode_masks
    blind.backbone.decode_masks = lambda *args: torch.full_like(decode(*args), -10.0)  # "outside" everywhere
    image = volume()
    box = {1: [[5, 4, 3, 20, 18, 8]]}
    assert (segment_volume_from_boxes(network, image, 2, box) == 1).any()
    assert not segment_volume_from_boxes(network, image, 2, box, guide=blind).any()
    label = np.zeros((40, 30, 12), np.int64)
    label[10:20, 5:15, 4] = 1
    out = segment_volume_from_labelled_slices(network, image, 2, label, guide=blind)
    assert np.array_equal(out[..., 4], label[..., 4]) and not np.delete(out, 4, axis=2).any()
    assert np.delete(segment_volume_from_labelled_slices(network, image, 2, label), 4, axis=2).any()
    # the clicked slice is the network's own (it knows the class); the guide takes it from there
    clicked = segment_volume_from_clicks(network, image, 2, {1: [[15, 10, 6]]}, guide=blind)
    assert clicked[..., 6].any() and not np.delete(clicked, 6, axis=2).any()


def test_bad_prompts_are_errors_naming_the_structure_and_slice(network):
    image = volume()
    with pytest.raises(ValueError, match=r"box 1 of 'pallidum' .* lies outside the volume \(40, 30, 12\) along axis 0 "
                                         r"\(5..45; expected 0..39\)"):
        segment_volume_from_boxes(network, image, 2, {1: [[5, 4, 3, 45, 18, 8]]}, class_names=["pallidum", "insula"])
    with pytest.raises(ValueError, match=r"box 1 of '1' .* is reversed along axis 2 \(8 > 3\)"):
        segment_volume_from_boxes(network, image, 2, {1: [[5, 4, 8, 20, 18, 3]]})
    with pytest.raises(ValueError, match=r"box 1 of '2' is \[1, 2, 3\]; expected \[i0, j0, k0, i1, j1, k1\]"):
        segment_volume_from_boxes(network, image, 2, {2: [[1, 2, 3]]})
    with pytest.raises(ValueError, match=r"boxes for class 3; expected 1..2"):
        segment_volume_from_boxes(network, image, 2, {3: [[1, 2, 3, 4, 5, 6]]})
    with pytest.raises(ValueError, match=r"labelled volume is \(40, 30\); expected the image's \(40, 30, 12\)"):
        segment_volume_from_labelled_slices(network, image, 2, np.zeros((40, 30)))
    with pytest.raises(ValueError, match=r"values \[7\]; expected class indices 0..2"):
        segment_volume_from_labelled_slices(network, image, 2, np.full((40, 30, 12), 7))
    with pytest.raises(ValueError, match="no labelled slice"):
        segment_volume_from_labelled_slices(network, image, 2, np.zeros((40, 30, 12)))
    prompt_free = SamSegmenter("lite_medsam_tiny", 2, checkpoint=None, image_size=SIZE).eval()
    with pytest.raises(ValueError, match="needs a box-prompted network; NoPrompt takes no prompts"):
        SliceEmbeddings(prompt_free, image, 2)


def test_a_users_drag_is_the_structures_box_moved_by_at_most_the_jitter():
    mask = np.zeros((50, 40, 30), bool)
    mask[10:30, 5:25, 8:18] = True
    assert box_around_structure(mask) == [10, 5, 8, 29, 24, 17]
    for seed in range(5):
        box = np.array(box_around_structure(mask, 0.05, np.random.default_rng(seed)))
        assert np.all(np.abs(box - [10, 5, 8, 29, 24, 17]) <= np.array([20, 20, 10] * 2) * 0.05 + 0.5)


def test_one_class_decoded_alone_gives_that_class_of_the_full_decode():
    torch.manual_seed(0)
    net = SamSegmenter("lite_medsam_tiny", 3, checkpoint=None, image_size=SIZE, prompt="mcp").eval()
    with torch.no_grad():
        for mlp in net.backbone.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.normal_(0, 0.5)
    image = torch.rand(1, 1, SIZE, SIZE)
    prompts = {"boxes": torch.tensor([[[2.0, 3, 30, 40], [10, 10, 50, 60], [0, 0, 63, 63]]]), "modality": "MRI"}
    with torch.no_grad():
        full = net(image, prompts)
        alone = net(image, prompts, only_class=1)
    torch.testing.assert_close(alone[:, 2], full[:, 2], atol=1e-5, rtol=1e-5)
    assert (alone[:, [1, 3]] < -1e3).all() and not (full[:, [1, 3]] < -1e3).all()
    with pytest.raises(ValueError, match="only_class 3"):
        net(image, prompts, only_class=3)


def test_prompt_sources_are_scored_side_by_side_with_the_oracle_labelled(network):
    from medsaga_components.evaluation.prompt_sources import (
        copy_nearest_labelled,
        evaluate_prompt_sources,
        markdown_table,
        user_clicks,
    )

    label = np.zeros((40, 30, 12), np.int64)
    label[8:20, 5:15, 2:10] = 1
    label[25:35, 18:26, 4:8] = 2
    copied = copy_nearest_labelled(label, 2, [3, 9], [5, 6, 7])
    assert np.array_equal(copied[..., 5], label[..., 3]) and np.array_equal(copied[..., 7], label[..., 9])
    assert (copied[..., [0, 1, 2, 4, 8]] == 0).all()
    clicks = user_clicks(label, 2, 2)
    assert sorted(clicks) == [1, 2] and all(len(c) == 1 for c in clicks.values())
    assert all(label[tuple(c)] == k for k, cs in clicks.items() for c in cs), "each click inside its structure"
    results = evaluate_prompt_sources(network, volume(), label, 2, [3, 9], range(2, 11),
                                      ["background", "a", "b"], ["copy_nearest", "box_3d", "oracle_slice_boxes"],
                                      log=lambda line: None)
    assert list(results) == ["copy_nearest", "box_3d", "oracle_slice_boxes"]
    assert results["oracle_slice_boxes"]["oracle"] and not results["box_3d"]["oracle"]
    assert results["copy_nearest"]["encoder_passes"] == 0 and results["box_3d"]["encoder_passes"] > 0
    for r in results.values():
        assert 0 <= r["mean_dice"] <= 1 and len(r["per_class"]) == 2
    table = markdown_table(results)
    assert "| oracle_slice_boxes (oracle) |" in table and "| box_3d |" in table


def test_interpolation_fills_between_labelled_slices_and_never_beyond():
    from medsaga_components.evaluation.prompt_sources import copy_nearest_labelled, interpolate_labelled

    # a cone along z: its radius grows from 3 on slice 2 to 13 on slice 12; a second class only on slice 12
    xx, yy = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
    label = np.zeros((40, 40, 16), np.int64)
    for k in range(2, 13):
        label[..., k][(xx - 20) ** 2 + (yy - 20) ** 2 <= (k + 1) ** 2] = 1
    label[2:6, 2:6, 12] = 2
    filled = interpolate_labelled(label, 2, [2, 12])
    assert np.array_equal(filled[..., [2, 12]], label[..., [2, 12]]), "the labelled slices stay as drawn"
    assert (filled[..., list(range(0, 2)) + list(range(13, 16))] == 0).all(), "nothing beyond the labelled slices"
    assert not (filled[..., :12] == 2).any(), "a class on one labelled slice is not extrapolated"
    middle = range(4, 11)
    areas = [(filled[..., k] == 1).sum() for k in middle]
    assert all(a < b for a, b in zip(areas, areas[1:])), f"the cross-sections grow slice by slice: {areas}"

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    copied = copy_nearest_labelled(label, 2, [2, 12], list(middle))
    truth = label[..., list(middle)] == 1
    assert dice(filled[..., list(middle)] == 1, truth) > dice(copied[..., list(middle)] == 1, truth) + 0.05


def test_prompt_sources_average_test_patients_per_source():
    from medsaga_components.evaluation.prompt_sources import average_results

    def run(dice, nsd):
        return {"box_3d": {"per_class": [{"name": "tumour", "dice": dice, "hd95_mm": 2.0, "nsd": nsd}],
                           "mean_dice": dice, "mean_hd95_mm": 2.0, "mean_nsd": nsd, "seconds": 10.0,
                           "encoder_passes": 4, "encoder_seconds": 8.0, "decoder_calls": 4, "oracle": False}}

    averaged = average_results({"pat_1/CT": run(0.8, 0.9), "pat_2/CT": run(0.4, None)})["box_3d"]
    assert averaged["mean_dice"] == pytest.approx(0.6) and averaged["per_class"][0]["dice"] == pytest.approx(0.6)
    assert averaged["mean_nsd"] == pytest.approx(0.9), "a patient without an NSD does not count as 0"
    assert averaged["per_class"][0]["name"] == "tumour" and averaged["oracle"] is False


def test_prompt_sources_read_a_datasets_test_patients_from_dicom(tmp_path):
    """``medsaga prompt-sources --dataset_dir``: the test patient of a cross-patient fold, whole,
    with no labelled slice of its own (``--split validation``: the validation patient)."""
    from medsaga_components.data.demo import write_demo_dataset
    from medsaga_components.evaluation.prompt_sources import dataset_volumes

    json_path = write_demo_dataset(str(tmp_path / "fold3"), task="lung_tumour_fold3")
    volumes, labelled, names, note = dataset_volumes(str(tmp_path / "fold3"))
    assert labelled == [] and names == ["background", "tumour"] and "test volumes ['pat_3/CT']" in note
    validation, *_ = dataset_volumes(str(tmp_path / "fold3"), "validation")  # where a guide is chosen
    assert list(validation) == ["pat_4/CT"]
    (image, label, spacing, test), = volumes.values()
    assert tuple(image.shape) == (1, 136, 137, 46) and 0 <= float(image.min()) and float(image.max()) <= 1
    assert test == list(range(46)) and spacing[2] == pytest.approx(3.0)
    assert int(np.count_nonzero(label.any(axis=(0, 1)))) == 12
    assert json_path.endswith("dataset.json")
