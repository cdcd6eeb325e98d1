"""Crops around the labelled structures (training) and the two-pass read that finds them (inference)."""

import pytest
import torch
from torch import nn

from medsaga_components.data.structure_crops import StructureCropd, crop_square, paste_square, square_around
from medsaga_components.inference.slices import SquareSliceInferer
from medsaga_components.inference.zoom import StructureCropTwoPass, ZoomInferer, with_zoom, zoom_setting


def _two_structures(size: int = 64) -> dict:
    """Class 1 a 4 x 6 block and class 2 a 6 x 4 block, close together in a larger slice; the
    image is the label map scaled, so alignment can be read off the crop."""
    label = torch.zeros(1, size, size, dtype=torch.long)
    label[0, 20:24, 24:30] = 1
    label[0, 28:34, 34:38] = 2
    return {"image": label.float() / 2, "label": label}


class Threshold(nn.Module):
    """A pixelwise network: class 1 where the image is above 0.25 (logits [B, 2, H, W])."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs = []

    def forward(self, image):
        self.inputs.append(image.detach().clone())
        return torch.cat([torch.zeros_like(image), (image - 0.25) * 20], dim=1)


def test_square_around_the_labels_with_margin_and_smallest_side():
    mask = _two_structures()["label"][0] > 0
    # box: rows 20..34, cols 24..38 -> 14 x 14, centre (31, 27)
    assert square_around(mask, margin=0.0, min_side=0) == (31.0, 27.0, 14.0)
    assert square_around(mask, margin=0.5, min_side=0) == (31.0, 27.0, 28.0)
    assert square_around(mask, margin=0.0, min_side=32) == (31.0, 27.0, 32.0)
    assert square_around(torch.zeros(8, 8, dtype=torch.bool), 0.3, 2) is None


def test_crop_then_paste_gives_the_slice_back():
    torch.manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    smooth = (torch.sin(rows / 7) * torch.cos(cols / 5))[None]  # [1, 64, 64]
    square = (30.0, 26.0, 20.0)
    crop = crop_square(smooth, square, 64)  # 20 px scaled to 64
    assert crop.shape == (1, 64, 64)
    back = paste_square(torch.full_like(smooth, 9.0), crop, square)
    inside = back != 9.0
    assert inside.sum() == 20 * 20  # exactly the square's pixels are replaced
    torch.testing.assert_close(back[inside], smooth[inside], atol=0.02, rtol=0)


def test_training_crops_keep_every_structure_whole_aligned_and_larger():
    transform = StructureCropd(whole_prob=0.0)
    transform.set_random_state(0)
    sample = _two_structures()
    for _ in range(50):
        out = transform(sample)
        image, label = out["image"], out["label"]
        assert image.shape == label.shape == (1, 64, 64) and label.dtype == torch.long
        # the margin (at least 0.15 of the box) exceeds the shift (at most 0.1 of the square):
        # every structure is inside, and scaled up (the square is at most 14 * 1.9 = 26.6 px)
        for c, pixels in ((1, 24), (2, 24)):
            assert (label == c).sum() >= pixels * (64 / 26.6) ** 2 * 0.8
        assert bool((label[image > 0.99] == 2).all()) and bool((label[image == 0] == 0).all())


def test_training_keeps_whole_slices_at_the_whole_prob_and_when_nothing_is_labelled():
    transform = StructureCropd(whole_prob=0.5)
    transform.set_random_state(0)
    sample = _two_structures()
    whole = sum(torch.equal(transform(sample)["label"], sample["label"]) for _ in range(400))
    assert 160 <= whole <= 240  # half, within sampling error
    empty = {"image": torch.rand(1, 32, 32), "label": torch.zeros(1, 32, 32, dtype=torch.long)}
    assert torch.equal(StructureCropd(whole_prob=0.0)(empty)["image"], empty["image"])


def test_two_passes_read_the_found_square_at_a_larger_scale():
    network = Threshold()
    image = _two_structures()["image"][None]  # [1, 1, 64, 64]
    logits = StructureCropTwoPass(network, margin=0.3)(image)
    first, second = network.inputs
    assert first.shape == second.shape == (1, 1, 64, 64)
    # the second pass sees the structures scaled: the square is 14 * 1.6 = 22.4 px -> 64 px
    assert (second > 0.25).sum() > 5 * (first > 0.25).sum()
    # a pixelwise network gives its own answer again, now from the finer read
    torch.testing.assert_close(logits.argmax(1), network(image).argmax(1))


def test_two_passes_keep_the_first_where_it_found_nothing():
    network = Threshold()
    blank = torch.zeros(2, 1, 32, 32)
    logits = StructureCropTwoPass(network)(blank)
    assert len(network.inputs) == 1  # nothing found: no second pass
    torch.testing.assert_close(logits, torch.cat([torch.zeros_like(blank), torch.full_like(blank, -5.0)], dim=1))


def test_validation_test_and_volume_inference_read_alike():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(1, 3, kernel_size=3, padding=1))
    squares = _two_structures(32)["image"][None]
    expected = StructureCropTwoPass(network)(squares)
    torch.testing.assert_close(ZoomInferer(zoom="structures")(squares, network), expected)
    through_inferer = SquareSliceInferer(image_size=32, axis=2, zoom="Structures")(squares[..., None], network)
    torch.testing.assert_close(through_inferer[..., 0], expected)


def test_zoom_setting_reads_numbers_and_structures_and_names_bad_values():
    assert zoom_setting("structures") == "structures" and zoom_setting(" Structures ") == "structures"
    assert zoom_setting(2) == 2.0 and zoom_setting("1.5") == 1.5
    assert isinstance(with_zoom(nn.Identity(), "structures"), StructureCropTwoPass)
    for bad in ("structure", 0.5, None):
        with pytest.raises(ValueError, match="zoom must be a number >= 1 .* or 'structures', got"):
            zoom_setting(bad)
    with pytest.raises(ValueError, match="prompt-free"):
        StructureCropTwoPass(nn.Identity())(torch.rand(1, 1, 8, 8), {"boxes": torch.zeros(1, 1, 4)})
