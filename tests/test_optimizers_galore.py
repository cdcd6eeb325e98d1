"""GaLore really projects: rank-r optimiser state, encoder weights that move, resumable state."""

import io

import pytest
import torch

from medsaga_components import SamSegmenter
from medsaga_components.methods import build_network
from medsaga_components.optimizers.galore import GaloreConfig, build_galore_optimizer, galore_target_weights


def _one_step(net, optimizer, size, loss_scale=1.0):
    x = torch.rand(2, 1, size, size)
    y = torch.randint(0, net.num_classes + 1, (2, size, size))
    loss = loss_scale * torch.nn.functional.cross_entropy(net(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("backbone,size", [("vit_tiny", 64), ("lite_medsam_tiny", 64)])
def test_encoder_rank_groups_hold_projected_state(backbone, size):
    net = SamSegmenter(backbone, num_classes=2, checkpoint=None, image_size=size)
    config = GaloreConfig(rank=4, update_proj_gap=200, scale=0.25)
    targets = galore_target_weights(net.backbone.image_encoder, config)
    before = {k: v.detach().clone() for k, v in targets.items()}
    optimizer = build_galore_optimizer(net, config, lr=1e-3)
    # Two steps: the class heads start at zero, so the first step's gradient stops at them.
    _one_step(net, optimizer, size)
    _one_step(net, optimizer, size)

    rank_groups = [g for g in optimizer.param_groups if "rank" in g]
    assert sum(len(g["params"]) for g in rank_groups) == len(targets)
    for group in rank_groups:
        for p in group["params"]:
            m, n = p.shape
            r = group["rank"]
            expected = (m, r) if m >= n else (r, n)  # galore-torch "std": project the smaller side
            state = optimizer.state[p]
            assert tuple(state["exp_avg"].shape) == expected, (tuple(p.shape), tuple(state["exp_avg"].shape))
            assert state["exp_avg"].numel() < p.numel()
    for name, p in targets.items():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change"


def test_projection_comes_from_the_first_nonzero_gradient():
    """The class heads start at zero, so step 1 sends an all-zero gradient to the encoder. A
    projection fixed from it would be coordinate axes for ``update_proj_gap`` steps; instead
    it is taken at step 2 and spans the top-r singular vectors of that step's gradient."""
    net = SamSegmenter("vit_tiny", num_classes=2, checkpoint=None, image_size=64)
    config = GaloreConfig(rank=4, update_proj_gap=200)
    optimizer = build_galore_optimizer(net, config, lr=1e-3)
    targets = galore_target_weights(net.backbone.image_encoder, config)
    _one_step(net, optimizer, 64)
    assert all(not p.grad.any() for p in targets.values())
    assert all("projector" not in optimizer.state[p] for p in targets.values())
    _one_step(net, optimizer, 64)
    for name, p in targets.items():
        grad = p.grad.detach()
        assert grad.any(), name
        ortho = optimizer.state[p]["projector"].ortho_matrix
        projected = grad @ ortho.t() if grad.shape[0] >= grad.shape[1] else ortho.t() @ grad
        top_r = torch.linalg.svdvals(grad)[:4].square().sum()
        assert torch.allclose(projected.square().sum(), top_r, rtol=1e-3), name


def test_medsaga_trains_only_targets_in_the_encoder_and_the_decoder_fully():
    net = build_network("medsaga", "vit_tiny", num_classes=2, checkpoint=None, image_size=64)
    trainable_encoder = sorted(n for n, p in net.backbone.image_encoder.named_parameters() if p.requires_grad)
    assert trainable_encoder == [f"blocks.{i}.{m}.weight" for i in (0, 1)
                                 for m in ("attn.proj", "attn.qkv", "mlp.lin1", "mlp.lin2")]
    assert all(p.requires_grad for p in net.backbone.mask_decoder.parameters())
    assert all(p.requires_grad for p in net.backbone.prompt_encoder.parameters())


def test_vit_b_qkv_state_is_2304_by_r():
    """The issue's example: ViT-B's qkv weight [2304, 768] keeps Adam moments of [2304, r]."""
    net = SamSegmenter("vit_b", num_classes=1, checkpoint=None, image_size=64)
    optimizer = build_galore_optimizer(net, GaloreConfig(rank=8), lr=1e-4)
    qkv = net.backbone.image_encoder.blocks[0].attn.qkv.weight
    assert tuple(qkv.shape) == (2304, 768)
    qkv.grad = torch.randn_like(qkv)
    optimizer.step()  # only qkv has a gradient: the step touches it alone
    assert tuple(optimizer.state[qkv]["exp_avg"].shape) == (2304, 8)


def test_optimizer_state_reloads_under_weights_only():
    net = SamSegmenter("vit_tiny", num_classes=1, checkpoint=None, image_size=64)
    optimizer = build_galore_optimizer(net, GaloreConfig(rank=4), lr=1e-3)
    _one_step(net, optimizer, 64)
    _one_step(net, optimizer, 64)  # the first step sends no gradient to the encoder
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # what MONAI's CheckpointLoader does
    fresh = build_galore_optimizer(SamSegmenter("vit_tiny", num_classes=1, checkpoint=None, image_size=64),
                                   GaloreConfig(rank=4), lr=1e-3)
    fresh.load_state_dict(state)
    projected = [s for s in fresh.state.values() if "projector" in s]
    assert projected and all(s["projector"].ortho_matrix is not None for s in projected)


def test_first_update_has_the_size_galore_scale_is_chosen_by():
    """Adam's first step is sign(grad) in the projected r x n space; projected back onto an
    orthonormal basis of the smaller side s, its entries have an RMS of sqrt(r / s). So a rank
    group moves each weight by lr * scale * sqrt(r / s) per entry (the rule GaloreConfig
    documents), not by lr * scale as AdamW at lr * scale would."""
    net = SamSegmenter("vit_tiny", num_classes=2, checkpoint=None, image_size=64)
    config = GaloreConfig(rank=4, update_proj_gap=200, scale=0.75)
    lr = 1e-3
    optimizer = build_galore_optimizer(net, config, lr=lr, weight_decay=0.0)
    targets = galore_target_weights(net.backbone.image_encoder, config)
    _one_step(net, optimizer, 64)  # all-zero encoder gradient: skipped
    before = {k: v.detach().clone() for k, v in targets.items()}
    # A random tiny network's encoder gradients are of the order of Adam's eps (1e-6); scaled up
    # they are well above it, as LiteMedSAM's are (median sqrt(v) 2.7e-4 on the demo data).
    _one_step(net, optimizer, 64, loss_scale=1e4)
    for name, p in targets.items():
        smaller = min(p.shape)
        rms = (p.detach() - before[name]).pow(2).mean().sqrt().item()
        expected = lr * config.scale * (min(config.rank, smaller - 1) / smaller) ** 0.5
        # entries whose gradient is near Adam's eps move less than sign(grad), never more
        assert 0.9 * expected < rms <= 1.001 * expected, (name, tuple(p.shape), rms, expected)
