"""Test-time flip averaging, alone and inside the volume inferer."""

import pytest
import torch
from torch import nn

from medsaga_components.inference.flips import FlipAveraged, with_test_time_flips
from medsaga_components.inference.slices import SquareSliceInferer


def _asymmetric_network() -> nn.Module:
    """A convolution whose kernel has no mirror symmetry, so each flipped view gives other logits."""
    torch.manual_seed(0)
    return nn.Conv2d(1, 3, kernel_size=3, padding=1)


def test_averages_the_four_mirrored_views_flipped_back():
    network = _asymmetric_network()
    image = torch.rand(2, 1, 16, 12)
    expected = (network(image) + network(image.flip(-1)).flip(-1) + network(image.flip(-2)).flip(-2)
                + network(image.flip(-2, -1)).flip(-2, -1)) / 4
    averaged = FlipAveraged(network)(image)
    assert averaged.shape == (2, 3, 16, 12)
    torch.testing.assert_close(averaged, expected)
    assert not torch.allclose(averaged, network(image), atol=1e-4)


def test_mirror_symmetric_network_is_unchanged():
    # A 1x1 convolution treats every pixel alike, so mirroring in and out changes nothing.
    network = nn.Conv2d(1, 3, kernel_size=1)
    image = torch.rand(1, 1, 8, 8)
    torch.testing.assert_close(FlipAveraged(network)(image), network(image))


def test_prompts_are_refused_and_switch_off_returns_the_network():
    network = _asymmetric_network()
    with pytest.raises(ValueError, match="prompts"):
        FlipAveraged(network)(torch.rand(1, 1, 8, 8), {"boxes": torch.zeros(1, 1, 4)})
    with pytest.raises(ValueError, match="at least one"):
        FlipAveraged(network, flips=())
    assert with_test_time_flips(network, False) is network


def test_volume_inferer_with_flips_equals_flip_averaged_network():
    network = _asymmetric_network()
    volume = torch.rand(1, 1, 20, 14, 3)  # [B, C, X, Y, Z], slices along Z
    flipped = SquareSliceInferer(image_size=32, axis=2, test_time_flips=True)(volume, network)
    by_hand = SquareSliceInferer(image_size=32, axis=2)(volume, FlipAveraged(network))
    plain = SquareSliceInferer(image_size=32, axis=2)(volume, network)
    assert flipped.shape == (1, 3, 20, 14, 3)
    torch.testing.assert_close(flipped, by_hand)
    assert not torch.allclose(flipped, plain, atol=1e-4)
