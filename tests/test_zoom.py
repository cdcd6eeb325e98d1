"""Zoomed crops for training and the zoomed sliding window that reads them at inference."""

from collections import Counter

import pytest
import torch
from torch import nn

from medsaga_components.data.zoom_crops import zoomed_crop_transforms
from medsaga_components.evaluation.test_volumes import evaluate_test_volumes
from medsaga_components.inference.slices import SquareSliceInferer
from medsaga_components.inference.zoom import ZoomedSlidingWindow, ZoomInferer, with_zoom


def _slice_with_two_classes() -> dict:
    """A 64 px slice: class 1 a 4 x 4 square (rare), class 2 a 10 x 10 square; the image is
    the label map itself (scaled), so alignment after the transform can be read off."""
    label = torch.zeros(1, 64, 64)
    label[0, 10:14, 10:14] = 1
    label[0, 40:50, 40:50] = 2
    return {"image": label / 2, "label": label.clone()}


def test_windows_are_zoomed_aligned_and_balanced_across_classes():
    transform = zoomed_crop_transforms(64, zoom=2, num_classes=2, background_ratio=1.0)
    transform.set_random_state(0)
    held = Counter()
    for _ in range(300):
        out = transform(_slice_with_two_classes())
        image, label = torch.as_tensor(out["image"]), torch.as_tensor(out["label"])
        assert image.shape == label.shape == (1, 64, 64)
        # Image and label moved together: full class-2 intensity only inside class 2, no
        # intensity at all only outside the classes (bilinear blends the rims in between).
        assert bool((label[image > 0.99] == 2).all())
        assert bool((label[image == 0] == 0).all())
        # Zoomed: the rare 4 px square is 8 px across in a window that holds it whole.
        rows = (label == 1).any(dim=-1).squeeze(0).nonzero()
        if len(rows) and 0 < rows.min() and rows.max() < 63:
            assert len(rows) == 8
        held[1] += bool((label == 1).any())
    # Windows are centred on background, class 1 or class 2 with equal chance (shifted to
    # stay inside the zoomed slice), so the rare class (16 of 4,096 pixels) is in about a
    # third of them; a window placed uniformly would hold it about a tenth of the time.
    assert 0.27 <= held[1] / 300 <= 0.45, held


def test_zoom_at_most_one_is_refused_for_crops():
    with pytest.raises(ValueError, match="zoom must be > 1"):
        zoomed_crop_transforms(64, zoom=1, num_classes=2)


def test_a_pixelwise_network_reads_the_same_at_any_zoom():
    # A 1 x 1 convolution treats every pixel alike: scaling the slice up, reading it in
    # windows and scaling the logits back gives its plain logits again (up to resampling).
    torch.manual_seed(0)
    network = nn.Conv2d(1, 3, kernel_size=1)
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    image = ((torch.sin(rows / 6) * torch.cos(cols / 5) + 1) / 2).expand(2, 1, 64, 64)  # smooth
    zoomed = ZoomedSlidingWindow(network, zoom=2)(image)
    assert zoomed.shape == (2, 3, 64, 64)
    torch.testing.assert_close(zoomed, network(image), atol=0.02, rtol=0)


def test_the_network_sees_windows_of_its_own_side_at_the_zoomed_scale():
    seen = []

    class Recorder(nn.Module):
        def forward(self, image):
            seen.append(tuple(image.shape))
            return image.repeat(1, 3, 1, 1)

    ZoomedSlidingWindow(Recorder(), zoom=2)(torch.rand(1, 1, 32, 32))
    windows = sum(shape[0] for shape in seen)
    assert all(shape[-2:] == (32, 32) for shape in seen)
    assert windows == 4  # 64 px read by 32 px windows: 2 x 2
    seen.clear()
    ZoomedSlidingWindow(Recorder(), zoom=2, overlap=0.25)(torch.rand(1, 1, 32, 32))
    assert sum(shape[0] for shape in seen) == 9  # overlapping by a quarter: 3 x 3


def test_prompts_and_zoom_below_one_are_refused_and_one_is_the_network():
    network = nn.Conv2d(1, 3, kernel_size=1)
    with pytest.raises(ValueError, match="prompt-free"):
        ZoomedSlidingWindow(network, zoom=2)(torch.rand(1, 1, 8, 8), {"boxes": torch.zeros(1, 1, 4)})
    with pytest.raises(ValueError, match="zoom must be a number >= 1"):
        ZoomInferer(zoom=0.5)
    with pytest.raises(ValueError, match="zoom must be a number >= 1"):
        SquareSliceInferer(image_size=32, zoom=0.5)
    assert with_zoom(network, 1) is network
    image = torch.rand(1, 1, 8, 8)
    torch.testing.assert_close(ZoomInferer(zoom=1)(image, network), network(image))


def test_validation_test_and_volume_inference_read_alike():
    torch.manual_seed(0)
    network = nn.Conv2d(1, 3, kernel_size=3, padding=1)  # not pixelwise: zoom changes its logits
    squares = torch.rand(1, 1, 32, 32)
    by_window = ZoomedSlidingWindow(network, zoom=2)(squares)
    torch.testing.assert_close(ZoomInferer(zoom=2)(squares, network), by_window)
    assert not torch.allclose(by_window, network(squares), atol=1e-3)
    volume = squares.permute(0, 1, 2, 3)[..., None]  # [B, C, X, Y, Z] with one 32 x 32 slice
    through_inferer = SquareSliceInferer(image_size=32, axis=2, zoom=2)(volume, network)
    torch.testing.assert_close(through_inferer[..., 0], by_window)


def test_test_evaluation_refuses_zoom_with_prompts(tmp_path):
    class Prompts:
        def prompts(self, labels):
            return {}

    with pytest.raises(ValueError, match="zoom cannot be combined with prompts"):
        evaluate_test_volumes(nn.Conv2d(1, 3, 1), [], tmp_path, prompts=Prompts(), zoom=2)
