"""LoRA: injection starts at the base model, q/v updates touch only q/v rows in both qkv
layouts, merged export equals the adapted model and loads strictly into a plain backbone,
and SAMed's trainable parameter count matches its published ~4.9 M."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsaga_components._segment_anything import MaskDecoder, TwoWayTransformer
from medsaga_components.adapters import (
    adapter_parameters,
    mark_only_adapters_trainable,
    merge_adapters,
    LoraConfig,
    LoraLinear,
    count_parameters,
    inject_lora,
    parameter_breakdown,
    qkv_part_rows,
)
from medsaga_components.backbones import build_backbone

SIZE = 64
BACKBONES = ["vit_tiny", "lite_medsam_tiny"]


def _backbone(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone(name, SIZE, checkpoint=None).eval()


def _images(seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _randomize_lora_B(module: nn.Module, seed: int = 2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter_parameters(module).items():
            if name.endswith(".B"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _decoder_logits(backbone, images: torch.Tensor) -> torch.Tensor:
    boxes = torch.tensor([[8.0, 8.0, 40.0, 48.0], [0.0, 4.0, 60.0, 30.0]])
    return backbone.predict_with_boxes(images, boxes)


def test_qkv_part_rows_blocked_and_interleaved():
    blocked = qkv_part_rows(12, ("q", "v"))
    assert blocked["q"].tolist() == [0, 1, 2, 3]
    assert blocked["v"].tolist() == [8, 9, 10, 11]
    # two heads of head_dim 2: head 0 rows 0-5 = q0 q0 k0 k0 v0 v0, head 1 rows 6-11
    interleaved = qkv_part_rows(12, ("q", "k", "v"), num_heads=2, head_dim=2)
    assert interleaved["q"].tolist() == [0, 1, 6, 7]
    assert interleaved["k"].tolist() == [2, 3, 8, 9]
    assert interleaved["v"].tolist() == [4, 5, 10, 11]
    with pytest.raises(ValueError):
        qkv_part_rows(13, ("q",))
    with pytest.raises(ValueError):
        qkv_part_rows(12, ("q",), num_heads=3, head_dim=2)


def test_config_scaling_and_validation():
    assert LoraConfig(rank=4).scaling == 1.0
    assert LoraConfig(rank=4, alpha=8).scaling == 2.0
    with pytest.raises(ValueError):
        LoraConfig(qkv_parts=("q", "x"))
    with pytest.raises(ValueError):
        LoraConfig(rank=0)


def test_lora_linear_computes_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoraLinear(base, rank=2, scaling=2.0)
    _randomize_lora_B(layer)
    x = torch.randn(3, 6)
    update = layer.lora["full"]
    expected = base(x) + 2.0 * x @ update.A.t() @ update.B.t()
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.merge()(x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", BACKBONES)
def test_injection_with_zero_B_equals_base(name):
    backbone = _backbone(name)
    images = _images()
    with torch.no_grad():
        expected = backbone.image_encoder(images)
        injected = inject_lora(backbone, LoraConfig())
        got = backbone.image_encoder(images)
    assert injected and all(isinstance(backbone.get_submodule(n), LoraLinear) for n in injected)
    assert all(float(p.detach().abs().sum()) == 0.0 for n, p in adapter_parameters(backbone).items() if n.endswith(".B"))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_trainable_parameters_vit_tiny_are_exactly_the_lora_factors():
    backbone = _backbone("vit_tiny")
    inject_lora(backbone, LoraConfig())
    trainable = mark_only_adapters_trainable(backbone)
    expected = [
        f"image_encoder.blocks.{i}.attn.qkv.lora.{part}.{factor}"
        for i in (0, 1) for part in ("q", "v") for factor in ("A", "B")
    ]
    assert trainable == sorted(expected)
    assert sorted(n for n, p in backbone.named_parameters() if p.requires_grad) == sorted(expected)
    # vit_tiny: dim 32, rank 4 -> per part A [4, 32] + B [32, 4]; 2 parts x 2 blocks
    assert count_parameters(backbone) == 2 * 2 * (4 * 32 + 32 * 4)


def test_trainable_parameters_lite_medsam_tiny_and_samed_extras():
    backbone = _backbone("lite_medsam_tiny")
    inject_lora(backbone, LoraConfig())
    trainable = mark_only_adapters_trainable(backbone, extra_trainable_prefixes=("prompt_encoder", "mask_decoder"))
    lora_names = sorted(
        f"image_encoder.layers.{stage}.blocks.0.attn.qkv.lora.{part}.{factor}"
        for stage in (1, 2, 3) for part in ("q", "v") for factor in ("A", "B")
    )
    assert [n for n in trainable if n.startswith("image_encoder.")] == lora_names
    others = {n for n, _ in backbone.named_parameters() if n.startswith(("prompt_encoder.", "mask_decoder."))}
    assert set(trainable) - set(lora_names) == others
    frozen_encoder = [n for n, p in backbone.image_encoder.named_parameters() if not p.requires_grad]
    assert "layers.1.blocks.0.attn.qkv.base_layer.weight" in frozen_encoder
    assert "layers.1.blocks.0.attn.proj.weight" in frozen_encoder


def test_gradients_reach_only_lora_factors():
    backbone = _backbone("vit_tiny")
    inject_lora(backbone, LoraConfig())
    mark_only_adapters_trainable(backbone)
    backbone.image_encoder(_images()).square().mean().backward()
    qkv = backbone.image_encoder.blocks[0].attn.qkv
    assert qkv.base_layer.weight.grad is None
    # B starts at zero, so only B receives a non-zero gradient on the first step (as in LoRA).
    assert qkv.lora["q"].B.grad is not None and qkv.lora["q"].B.grad.abs().sum() > 0
    assert qkv.lora["v"].B.grad.abs().sum() > 0


def _split_qkv(name: str, attention: nn.Module, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Split a fused qkv output ``[N, 3*dim]`` exactly as each encoder's attention does."""
    n = y.shape[0]
    heads = attention.num_heads
    if name == "vit_tiny":  # SAM: reshape(B, N, 3, heads, head_dim)
        parts = y.reshape(n, 3, heads, -1).unbind(1)
    else:  # TinyViT: view(B, N, heads, 3 * head_dim).split(head_dim)
        parts = y.view(n, heads, -1).split(attention.head_dim, dim=-1)
    return tuple(parts)


@pytest.mark.parametrize("name", BACKBONES)
def test_qv_lora_changes_only_q_and_v_of_the_attention(name):
    backbone = _backbone(name)
    injected = inject_lora(backbone, LoraConfig(qkv_parts=("q", "v")))
    _randomize_lora_B(backbone)
    for qkv_name in injected:
        layer = backbone.get_submodule(qkv_name)
        attention = backbone.get_submodule(qkv_name.rpartition(".")[0])
        x = torch.randn(5, layer.in_features)
        with torch.no_grad():
            q0, k0, v0 = _split_qkv(name, attention, layer.base_layer(x))
            q1, k1, v1 = _split_qkv(name, attention, layer(x))
        assert torch.equal(k1, k0), qkv_name
        assert (q1 != q0).all() and (v1 != v0).all(), qkv_name


@pytest.mark.parametrize("name", BACKBONES)
def test_merged_export_equals_adapted_and_loads_strictly_into_plain(name):
    images = _images()
    plain = _backbone(name, seed=0)
    backbone = _backbone(name, seed=0)
    inject_lora(backbone, LoraConfig())
    _randomize_lora_B(backbone)
    with torch.no_grad():
        base_out = plain.image_encoder(images)
        adapted_out = backbone.image_encoder(images)
        assert not torch.allclose(adapted_out, base_out, atol=1e-3)  # the update is really there

        merge_adapters(backbone)
        assert not any(isinstance(m, LoraLinear) for m in backbone.modules())
        torch.testing.assert_close(backbone.image_encoder(images), adapted_out, atol=1e-5, rtol=1e-5)

        merged_state = backbone.state_dict()
        fresh = _backbone(name, seed=123)
        assert {k: v.shape for k, v in merged_state.items()} == {k: v.shape for k, v in fresh.state_dict().items()}
        fresh.load_state_dict(merged_state, strict=True)
        torch.testing.assert_close(fresh.image_encoder(images), adapted_out, atol=1e-5, rtol=1e-5)


def test_whole_output_lora_on_mask_decoder_merges_exactly():
    """Cheap Lunch: LoRA on the encoder and on the mask decoder's attention projections."""
    images = _images()
    backbone = _backbone("vit_tiny")
    decoder_targets = ("q_proj", "k_proj", "v_proj", "out_proj")
    inject_lora(backbone, LoraConfig())
    injected = inject_lora(backbone, LoraConfig(target_modules=decoder_targets), root="mask_decoder")
    # TwoWayTransformer depth 2: 3 attentions per layer, plus the final token-to-image attention
    assert len(injected) == (2 * 3 + 1) * len(decoder_targets)
    assert all(set(backbone.get_submodule(n).lora.keys()) == {"full"} for n in injected)
    _randomize_lora_B(backbone)
    with torch.no_grad():
        adapted = _decoder_logits(backbone, images)
        merge_adapters(backbone)
        torch.testing.assert_close(_decoder_logits(backbone, images), adapted, atol=1e-5, rtol=1e-5)
        fresh = _backbone("vit_tiny", seed=7)
        fresh.load_state_dict(backbone.state_dict(), strict=True)
        torch.testing.assert_close(_decoder_logits(fresh, images), adapted, atol=1e-5, rtol=1e-5)


def test_unknown_target_raises():
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_lora(_backbone("vit_tiny"), LoraConfig(target_modules=("qvk",)))


def test_samed_vit_b_512_trainable_parameters_match_published_4_9M():
    """SAMed (ViT-B, 512 px, 8 organ classes) trains about 4.9 M parameters. Counted here as:

    * LoRA r=4 on q and v of the fused qkv in all 12 encoder blocks (dim 768):
      12 blocks x 2 parts x (A [4, 768] + B [768, 4]) = 147,456;
    * the whole prompt encoder (its Fourier position matrix is a buffer, not counted);
    * a mask decoder with 8 + 1 = 9 mask tokens (one per class plus background), i.e.
      ``num_multimask_outputs=8``: 9 hypernetwork MLPs and a 9-way IoU head.
    The encoder's own weights are frozen. Random weights suffice: only shapes matter.
    """
    backbone = build_backbone("vit_b", 512, checkpoint=None)
    backbone.mask_decoder = MaskDecoder(
        num_multimask_outputs=8,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
    )
    assert backbone.mask_decoder.num_mask_tokens == 9
    inject_lora(backbone, LoraConfig(rank=4, qkv_parts=("q", "v")))
    mark_only_adapters_trainable(backbone, extra_trainable_prefixes=("prompt_encoder", "mask_decoder"))

    lora_count = sum(p.numel() for p in adapter_parameters(backbone).values())
    assert lora_count == 12 * 2 * (4 * 768 + 768 * 4) == 147_456
    prompt_count = count_parameters(backbone.prompt_encoder, trainable_only=False)
    decoder_count = count_parameters(backbone.mask_decoder, trainable_only=False)
    breakdown = parameter_breakdown(backbone)
    print(f"SAMed ViT-B 512 px, 8 classes: LoRA {lora_count:,}, prompt encoder {prompt_count:,}, "
          f"mask decoder (9 tokens) {decoder_count:,}, total trainable {breakdown['total']:,}; "
          f"all parameters {count_parameters(backbone, trainable_only=False):,}")
    assert breakdown == {"image_encoder": lora_count, "prompt_encoder": prompt_count,
                         "mask_decoder": decoder_count, "total": lora_count + prompt_count + decoder_count}
    assert 4_000_000 <= breakdown["total"] <= 5_500_000
