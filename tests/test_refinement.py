"""BoundaryRefiner: starts as the identity, learns from the image, travels in plain weights."""

import pytest
import torch
import torch.nn.functional as F

from medsaga_components import SamSegmenter
from medsaga_components.methods import build_network, build_optimizer
from medsaga_components.refinement import BoundaryRefiner


def test_fresh_refiner_changes_nothing_and_its_weights_sit_in_the_head_group():
    plain = SamSegmenter("lite_medsam_tiny", num_classes=2, checkpoint=None, image_size=64).eval()
    refined = SamSegmenter("lite_medsam_tiny", num_classes=2, checkpoint=None, image_size=64,
                           boundary_refinement=True).eval()
    missing, unexpected = refined.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith("refiner.") for k in missing)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(refined(x), plain(x))
    heads = {id(p) for p in refined.class_head_parameters()}
    assert all(id(p) in heads for p in refined.refiner.parameters())


def test_refiner_learns_an_edge_the_logits_do_not_show():
    # The logits say nothing (all zero); the image has a sharp edge that the target follows.
    # Only the image channel can explain the target, so the refiner must learn to use it.
    torch.manual_seed(0)
    refiner = BoundaryRefiner(num_masks=2, hidden=8)
    image = torch.zeros(4, 1, 16, 16)
    image[..., 5:] = 1.0
    target = (image[:, 0] > 0.5).long()
    optimizer = torch.optim.Adam(refiner.parameters(), lr=0.05)
    logits = torch.zeros(4, 2, 16, 16)
    start = F.cross_entropy(refiner(logits, image), target).item()
    for _ in range(60):
        optimizer.zero_grad()
        loss = F.cross_entropy(refiner(logits, image), target)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * start
    assert torch.equal(refiner(logits, image).argmax(1), target)


def test_refined_medsaga_network_trains_and_reloads_from_plain_weights():
    net = build_network("medsaga", "lite_medsam_tiny", num_classes=2, checkpoint=None, image_size=64,
                        boundary_refinement=True)
    optimizer = build_optimizer("medsaga", net, head_lr=1e-2)
    x, y = torch.rand(2, 1, 64, 64), torch.randint(0, 3, (2, 64, 64))
    before = net.refiner.layers[-1].weight.detach().clone()
    F.cross_entropy(net(x), y).backward()
    optimizer.step()
    assert not torch.equal(net.refiner.layers[-1].weight, before)
    fresh = SamSegmenter("lite_medsam_tiny", num_classes=2, checkpoint=None, image_size=64, boundary_refinement=True)
    fresh.load_state_dict(net.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), net.eval()(x))


def test_refinement_with_per_class_prompts_is_refused():
    with pytest.raises(ValueError, match="boundary_refinement needs the prompt-free"):
        SamSegmenter("lite_medsam_tiny", num_classes=2, checkpoint=None, image_size=64, prompt="boxes",
                     boundary_refinement=True)
