"""SAM ViT's attention a few query rows at a time, so that its N x N matrices never exist whole.

segment-anything's ``Attention`` computes ``softmax(q k^T * scale + relative-position bias) v`` with
explicit ``[B * heads, N, N]`` tensors: at 512 px (N = 1,024 tokens, 12 heads) 48 MiB per image for
each of the logits, the biased logits and the softmax, and the softmax backward needs two more of
that size. Activation checkpointing recomputes a block one at a time, but inside a global-attention
block these matrices are the step's largest transient (docs/memory_and_speed.md, SAM ViT-B), and
in a windowed block (14 x 14 tokens per window, every window at once) they are about half of
what the block keeps. Here the queries are split into chunks of whole token rows; each chunk's
attention is its own checkpoint (non-reentrant, so it nests inside the block's), so forward,
recomputation and backward hold one chunk's ``[B * heads, rows * W, N]`` matrices at a time. The result is the same
computation, summed in the same order per query; only where the work is split changes.

The relative-position bias is segment-anything's decomposed one (MViTv2): for the query at
``(h, w)`` and the key at ``(h', w')`` it adds ``q . Rh[h, h'] + q . Rw[w, w']``, computed here for
the chunk's query rows only. A windowed block's attention sees a batch of windows, each a small
token grid, and is split the same way.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from medsaga_components._segment_anything import ImageEncoderViT
from medsaga_components.forward_patch import ForwardPatch
from segment_anything.modeling.image_encoder import get_rel_pos  # importable once _segment_anything has run

CHUNKS = 8  # at 512 px: 4 query rows of 32 per chunk in a global block (6 MiB per [heads, rows x W, N]
# matrix and image), 2 rows of 14 in a window


def attend_query_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor | None,
                      rel_w: torch.Tensor | None, scale: float, height: int, width: int) -> torch.Tensor:
    """Attention of a chunk of whole query rows over all keys.

    Args:
        q: ``[B * heads, rows * width, C]`` queries of ``rows`` consecutive token rows.
        k, v: ``[B * heads, height * width, C]`` all keys and values.
        rel_h: ``[rows, height, C]`` height bias embeddings of those rows (None: no bias).
        rel_w: ``[width, width, C]`` width bias embeddings.
    Returns:
        ``[B * heads, rows * width, C]``.
    """
    n, tokens, channels = q.shape
    rows = tokens // width
    attn = (q * scale) @ k.transpose(-2, -1)  # [n, rows * width, height * width]
    if rel_h is not None:
        r_q = q.reshape(n, rows, width, channels)
        bias_h = torch.einsum("bhwc,hkc->bhwk", r_q, rel_h)  # [n, rows, width, height]
        bias_w = torch.einsum("bhwc,wkc->bhwk", r_q, rel_w)  # [n, rows, width, width]
        attn = (attn.view(n, rows, width, height, width) + bias_h[..., None] + bias_w[:, :, :, None, :])
        attn = attn.view(n, tokens, height * width)
    return attn.softmax(dim=-1) @ v


class RowChunkedAttention(ForwardPatch):
    """A segment-anything ``Attention``'s forward, ``[B, H, W, C] -> [B, H, W, C]``, with the queries in
    ``chunks`` checkpointed chunks of whole rows while autograd records; otherwise its own forward
    (nothing to store then).

    Args:
        module: a SAM ViT block's ``Attention`` (global, or over a batch of windows).
        chunks: how many chunks the ``H`` query rows are split into (fewer when ``H`` is smaller).
    """

    def __init__(self, module: nn.Module, chunks: int = CHUNKS) -> None:
        super().__init__(module)
        self.chunks = chunks

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.original_forward()(x)
        a = self.module
        batch, height, width, _ = x.shape
        qkv = a.qkv(x).reshape(batch, height * width, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * a.num_heads, height * width, -1).unbind(0)
        rel_h = get_rel_pos(height, height, a.rel_pos_h) if a.use_rel_pos else None  # [H, H, C]
        rel_w = get_rel_pos(width, width, a.rel_pos_w) if a.use_rel_pos else None  # [W, W, C]
        rows = math.ceil(height / min(self.chunks, height))
        out = [checkpoint(attend_query_rows, q[:, r0 * width:min(r0 + rows, height) * width], k, v,
                          None if rel_h is None else rel_h[r0:r0 + rows], rel_w, a.scale, height, width,
                          use_reentrant=False)
               for r0 in range(0, height, rows)]
        out = torch.cat(out, dim=1).view(batch, a.num_heads, height, width, -1)
        return a.proj(out.permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1))


def vit_attention_modules(encoder: nn.Module) -> list[nn.Module]:
    """The ``Attention`` of every block of a SAM ViT encoder (none for other encoders)."""
    if not isinstance(encoder, ImageEncoderViT):
        return []
    return [block.attn for block in encoder.blocks]


def set_chunked_attention(encoder: nn.Module, on: bool, chunks: int = CHUNKS) -> None:
    """Install (``on``) or remove :class:`RowChunkedAttention` on every attention of a SAM ViT ``encoder``."""
    for attention in vit_attention_modules(encoder):
        RowChunkedAttention.remove(attention)
        if on:
            RowChunkedAttention(attention, chunks).install()


__all__ = ["CHUNKS", "RowChunkedAttention", "attend_query_rows", "set_chunked_attention", "vit_attention_modules"]
