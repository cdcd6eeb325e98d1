"""SamSegmenter: class logits for MONAI, prompt kinds, decoder widening."""

import pytest
import torch

from medsaga_components import SamSegmenter, build_backbone
from medsaga_components.prompts import PROMPT_KINDS, PromptKind


@pytest.mark.parametrize("backbone,size", [("vit_tiny", 64), ("lite_medsam_tiny", 64)])
@pytest.mark.parametrize("channels", [1, 3])
def test_segmenter_returns_class_logits_at_input_size(backbone, size, channels):
    net = SamSegmenter(backbone, num_classes=2, checkpoint=None, image_size=size)
    out = net(torch.rand(2, channels, 48, 80))
    assert tuple(out.shape) == (2, 3, 48, 80)
    assert torch.isfinite(out).all()


def test_gray_input_equals_repeated_rgb():
    net = SamSegmenter("lite_medsam_tiny", num_classes=1, checkpoint=None, image_size=64).eval()
    x = torch.rand(1, 1, 64, 64)
    assert torch.allclose(net(x), net(x.repeat(1, 3, 1, 1)), atol=1e-6)


def test_widened_decoder_starts_from_pretrained_tokens():
    pretrained = build_backbone("lite_medsam")
    original = pretrained.mask_decoder.mask_tokens.weight.detach().clone()
    net = SamSegmenter(pretrained, num_classes=5)
    tokens = net.backbone.mask_decoder.mask_tokens.weight
    assert tuple(tokens.shape) == (6, 256)
    assert torch.equal(tokens[:4], original) and torch.equal(tokens[4:], original[:2])
    assert len(net.backbone.mask_decoder.output_hypernetworks_mlps) == 6
    # Class heads start at logit 0 everywhere: uniform softmax, no saturated SAM object logits.
    with torch.no_grad():
        assert torch.count_nonzero(net(torch.rand(1, 1, 64, 64))) == 0


def test_state_dict_round_trips_into_a_fresh_plain_network():
    net = SamSegmenter("vit_tiny", num_classes=3, checkpoint=None, image_size=64).eval()
    fresh = SamSegmenter("vit_tiny", num_classes=3, checkpoint=None, image_size=64).eval()
    fresh.load_state_dict(net.state_dict(), strict=True)
    x = torch.rand(1, 1, 64, 64)
    assert torch.equal(net(x), fresh(x))


def test_per_class_prompts_decode_one_query_per_class():
    net = SamSegmenter("vit_tiny", num_classes=2, checkpoint=None, image_size=64, prompt="boxes").eval()
    boxes = torch.tensor([[[2.0, 2, 30, 30], [20, 20, 60, 60]]])
    out = net(torch.rand(1, 1, 64, 64), {"boxes": boxes})
    assert tuple(out.shape) == (1, 3, 64, 64)
    assert torch.all(out[:, 0] == 0), "background channel is 0 so argmax follows the sigmoid"
    with pytest.raises(ValueError, match="needs prompt keys \\['boxes'\\]"):
        net(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="one query per class"):
        net(torch.rand(1, 1, 64, 64), {"boxes": boxes[:, :1]})


def test_class_token_prompt_is_trainable_and_needs_no_input():
    net = SamSegmenter("lite_medsam_tiny", num_classes=3, checkpoint=None, image_size=64, prompt="class_tokens")
    out = net(torch.rand(2, 1, 64, 64))
    assert tuple(out.shape) == (2, 4, 64, 64)
    out[:, 1:].sum().backward()
    assert net.prompt.class_embeddings.grad is not None and net.prompt.class_embeddings.grad.abs().sum() > 0


def test_point_prompts():
    net = SamSegmenter("vit_tiny", num_classes=1, checkpoint=None, image_size=64, prompt="points")
    points = torch.tensor([[[[10.0, 12.0], [40.0, 41.0]]]])  # [B=1, Q=1, P=2, 2]
    out = net(torch.rand(1, 3, 64, 64), {"points": points, "point_labels": torch.tensor([[[1, 0]]])})
    assert tuple(out.shape) == (1, 2, 64, 64)


def test_new_prompt_kinds_plug_in_without_changing_the_segmenter():
    class ShiftedNoPrompt(PromptKind):
        def forward(self, prompt_encoder, batch_size, prompts):
            sparse, dense = super().forward(prompt_encoder, batch_size, prompts)
            return sparse, dense + 1.0

    net = SamSegmenter("vit_tiny", num_classes=1, checkpoint=None, image_size=64,
                       prompt=ShiftedNoPrompt(1, 32)).eval()
    for mlp in net.backbone.mask_decoder.output_hypernetworks_mlps:  # as after training: non-zero heads
        torch.nn.init.normal_(mlp.layers[-1].weight)
    plain = SamSegmenter("vit_tiny", num_classes=1, checkpoint=None, image_size=64).eval()
    plain.load_state_dict(net.state_dict())
    x = torch.rand(1, 1, 64, 64)
    assert not torch.allclose(net(x), plain(x))
    assert set(PROMPT_KINDS) >= {"none", "boxes", "points", "class_tokens"}


def test_bad_input_shape_is_a_clear_error():
    net = SamSegmenter("vit_tiny", num_classes=1, checkpoint=None, image_size=64)
    with pytest.raises(ValueError, match=r"expected image \[B, 1 or 3, H, W\]"):
        net(torch.rand(1, 2, 64, 64))
