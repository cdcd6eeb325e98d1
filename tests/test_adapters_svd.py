"""S-SAM singular-value adaptation: identity at a=1, b=0; merged export equals the adapted
model and loads strictly into a plain backbone; trainable numbers are 2 * sum(min(out, in))."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsaga_components.adapters import (
    adapter_parameters,
    mark_only_adapters_trainable,
    merge_adapters,
    SvdConfig,
    SvdConv2d,
    SvdLinear,
    count_parameters,
    inject_svd,
)
from medsaga_components.backbones import build_backbone

SIZE = 64
BACKBONES = ["vit_tiny", "lite_medsam_tiny"]


def _backbone(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone(name, SIZE, checkpoint=None).eval()


def _images(seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _randomize_scale_shift(module: nn.Module, seed: int = 2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter_parameters(module).items():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.3 * noise if name.endswith("scale") else 0.05 * noise)


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


@pytest.mark.parametrize("name", BACKBONES)
def test_identity_at_init_equals_base(name):
    backbone = _backbone(name)
    images = _images()
    with torch.no_grad():
        expected = backbone.image_encoder(images)
        replaced = inject_svd(backbone, SvdConfig())
        got = backbone.image_encoder(images)
    assert any(isinstance(backbone.get_submodule(n), SvdConv2d) for n in replaced)
    assert any(isinstance(backbone.get_submodule(n), SvdLinear) for n in replaced)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert _relative_error(got, expected) < 1e-5


def test_targets_vit_tiny_and_trainable_names():
    backbone = _backbone("vit_tiny")
    replaced = inject_svd(backbone, SvdConfig())
    layers = [f"blocks.{i}.{m}" for i in (0, 1) for m in ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2")]
    layers += ["neck.0", "neck.2"]
    assert replaced == [f"image_encoder.{n}" for n in layers]
    # SAM's patch embedding is a Conv2d called "proj": not a Linear target, left alone
    assert type(backbone.image_encoder.patch_embed.proj) is nn.Conv2d
    trainable = mark_only_adapters_trainable(backbone)
    assert trainable == sorted(f"image_encoder.{n}.{p}" for n in layers for p in ("scale", "shift"))
    assert not backbone.image_encoder.blocks[0].attn.qkv.bias.requires_grad
    buffers = dict(backbone.named_buffers())
    assert {"image_encoder.neck.2.U", "image_encoder.neck.2.singular_values", "image_encoder.neck.2.Vh"} <= set(buffers)


@pytest.mark.parametrize("name", BACKBONES)
def test_scale_shift_count_is_twice_the_sum_of_min_dims(name):
    plain = _backbone(name)
    backbone = _backbone(name)
    replaced = inject_svd(backbone, SvdConfig())
    mark_only_adapters_trainable(backbone)
    expected_k = 0
    for layer_name in replaced:
        weight = plain.get_submodule(layer_name).weight
        expected_k += min(weight.shape[0], weight[0].numel())  # conv: [out, in * kh * kw]
        adapter = backbone.get_submodule(layer_name)
        assert adapter.scale.shape == adapter.shift.shape == (min(weight.shape[0], weight[0].numel()),)
    assert count_parameters(backbone) == 2 * expected_k
    if name == "vit_tiny":  # dim 32: every weight (and both neck convs) has min(out, in) = 32
        assert count_parameters(backbone) == 2 * 32 * (2 * 4 + 2)


@pytest.mark.parametrize("name", BACKBONES)
def test_merged_export_equals_adapted_and_loads_strictly_into_plain(name):
    images = _images()
    plain = _backbone(name, seed=0)
    backbone = _backbone(name, seed=0)
    inject_svd(backbone, SvdConfig())
    _randomize_scale_shift(backbone)
    with torch.no_grad():
        base_out = plain.image_encoder(images)
        adapted_out = backbone.image_encoder(images)
        assert not torch.allclose(adapted_out, base_out, atol=1e-3)  # the adaptation is really there

        merge_adapters(backbone)
        assert not any(isinstance(m, (SvdLinear, SvdConv2d)) for m in backbone.modules())
        torch.testing.assert_close(backbone.image_encoder(images), adapted_out, atol=1e-5, rtol=1e-5)

        merged_state = backbone.state_dict()
        fresh = _backbone(name, seed=123)
        assert {k: v.shape for k, v in merged_state.items()} == {k: v.shape for k, v in fresh.state_dict().items()}
        fresh.load_state_dict(merged_state, strict=True)
        torch.testing.assert_close(fresh.image_encoder(images), adapted_out, atol=1e-5, rtol=1e-5)


def test_adapted_checkpoint_reloads_without_recomputing_svd():
    images = _images()
    trained = _backbone("vit_tiny", seed=0)
    inject_svd(trained, SvdConfig())
    _randomize_scale_shift(trained)
    state = trained.state_dict()
    assert "image_encoder.blocks.0.attn.qkv.U" in state  # factors are persistent buffers

    other = _backbone("vit_tiny", seed=5)  # different base weights: everything must come from the file
    inject_svd(other, SvdConfig(), decompose=False)
    assert float(other.image_encoder.blocks[0].attn.qkv.U.abs().sum()) == 0.0
    other.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(other.image_encoder(images), trained.image_encoder(images))


def test_relu_clamps_singular_values_and_gradients_reach_scale_and_shift():
    torch.manual_seed(0)
    layer = SvdLinear(nn.Linear(8, 5))
    with torch.no_grad():
        layer.shift[:2] = -1e3
    assert (layer.adapted_singular_values()[:2] == 0).all()
    assert (layer.adapted_singular_values()[2:] > 0).all()
    layer(torch.randn(4, 8)).sum().backward()
    assert layer.scale.grad is not None and layer.scale.grad[2:].abs().sum() > 0
    assert layer.shift.grad[2:].abs().sum() > 0
    assert layer.bias.grad is None  # base bias frozen


def test_no_target_raises():
    with pytest.raises(ValueError):
        inject_svd(_backbone("vit_tiny"), SvdConfig(target_modules=("nothing",), include_neck=False))
