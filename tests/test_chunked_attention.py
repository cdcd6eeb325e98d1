"""SAM ViT's attention in checkpointed chunks of query rows: the same outputs and gradients as
segment-anything's own ``Attention``, far less kept for backward, on every ViT block.
(Training with it, inside the block checkpoints, is checked against the plain mode in
tests/test_memory_efficient.py.)"""

import pytest
import torch

from medsaga_components.backbones import build_backbone
from medsaga_components.training.chunked_attention import (
    RowChunkedAttention,
    set_chunked_attention,
    vit_attention_modules,
)
from segment_anything.modeling.image_encoder import Attention  # noqa: E402 (after medsaga registered the package)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _attention(grid: int) -> Attention:
    torch.manual_seed(0)
    attention = Attention(dim=32, num_heads=2, use_rel_pos=True, rel_pos_zero_init=False, input_size=(grid, grid))
    torch.nn.init.normal_(attention.rel_pos_h, std=0.5)  # a bias that matters: zeros would hide a wrong one
    torch.nn.init.normal_(attention.rel_pos_w, std=0.5)
    return attention


def _saved_bytes(module, x) -> tuple[torch.Tensor, int]:
    sizes = {}

    def pack(t):
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    return out, sum(sizes.values())


@pytest.mark.parametrize("height,width,chunks", [(16, 16, 8), (12, 10, 5), (7, 9, 3)])  # uneven last chunk too
def test_same_outputs_and_gradients_as_segment_anythings_attention(height, width, chunks):
    attention = _attention(max(height, width))
    x = torch.randn(2, height, width, 32, requires_grad=True)
    expected = attention(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *attention.parameters()])
    RowChunkedAttention(attention, chunks).install()
    out = attention(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *attention.parameters()])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):  # x, qkv, proj and both relative-position tables
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_keeps_far_less_for_backward():
    attention = _attention(16)
    x = torch.randn(2, 16, 16, 32, requires_grad=True)  # 256 tokens: 2 x 2 heads x 256 x 256 per attention matrix
    _, plain = _saved_bytes(attention, x)
    RowChunkedAttention(attention, 8).install()
    out, chunked = _saved_bytes(attention, x)
    matrix = 2 * 2 * 256 * 256 * 4
    assert plain > matrix and chunked < matrix / 2 and chunked < plain / 3, (plain, chunked, matrix)
    out.sum().backward()  # the recomputation runs
    assert x.grad is not None


def test_every_vit_block_gets_it_once_and_it_comes_off_again():
    encoder = build_backbone("vit_tiny", checkpoint=None, image_size=64).image_encoder
    attentions = vit_attention_modules(encoder)  # vit_tiny: block 0 windowed, block 1 global
    assert attentions == [encoder.blocks[0].attn, encoder.blocks[1].attn]
    set_chunked_attention(encoder, True)
    set_chunked_attention(encoder, True)  # twice: still one patch
    assert all(RowChunkedAttention.installed_on(a) and a.forward.previous is None for a in attentions)
    set_chunked_attention(encoder, False)
    assert all("forward" not in a.__dict__ for a in attentions)
    assert vit_attention_modules(build_backbone("lite_medsam_tiny", checkpoint=None, image_size=64).image_encoder) == []
