"""LoRA: frozen linear layers plus trainable low-rank updates, merged back for export.

The pattern follows HuggingFace peft (a config, a layer that wraps ``nn.Linear``,
injection by module name, a merge that hands back plain layers); the code is medsaga's.

SAMed puts rank-4 LoRA on the q and v projections of every encoder block. SAM's blocks
(and TinyViT's) compute q, k and v with one fused ``qkv`` Linear ``dim -> 3 * dim``, so a
"q LoRA" is a low-rank update added only to the output rows that become q. Which rows
those are depends on how the attention splits the fused output:

* SAM ``ImageEncoderViT`` (``reshape(B, N, 3, heads, head_dim)``): blocked,
  ``[q (dim rows) | k (dim rows) | v (dim rows)]``.
* TinyViT ``WindowAttention`` (``view(B, N, heads, 3 * head_dim)``, split per head):
  interleaved per head, head h owns rows ``[h*3*hd, (h+1)*3*hd)`` as ``[q | k | v]``.

``qkv_part_rows`` turns either layout into an explicit index of output rows per part, and
``inject_lora`` picks the layout from the attention module that owns the ``qkv`` Linear.

Shapes: a wrapped Linear maps ``[..., in_features] -> [..., out_features]``; a low-rank
update for a part with R output rows has ``A: [rank, in_features]`` and ``B: [R, rank]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..backbones.tiny_vit import WindowAttention
from .base import AdapterLayer, replace_layers

# Targets with this name are fused q|k|v projections; ``LoraConfig.qkv_parts`` applies to them only.
FUSED_QKV_NAME = "qkv"
QKV_PARTS = ("q", "k", "v")
# Key of the update that covers every output row (plain targets such as the decoder's q_proj).
WHOLE_OUTPUT = "full"


@dataclass(frozen=True)
class LoraConfig:
    """Where and how big the low-rank updates are.

    Args:
        rank: r, the inner dimension of each update ``B @ A``.
        alpha: the update is scaled by ``alpha / rank``; None means ``alpha = rank`` (scaling 1,
            as SAMed uses).
        dropout: dropout probability on the input of the low-rank path (training only).
        target_modules: names (last dotted component) of the ``nn.Linear`` modules to adapt.
        qkv_parts: for fused ``qkv`` targets, which of ``"q"``, ``"k"``, ``"v"`` get their own
            update; None gives fused targets one whole-output update like any other Linear.
    """

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: tuple[str, ...] = (FUSED_QKV_NAME,)
    qkv_parts: tuple[str, ...] | None = ("q", "v")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("LoraConfig.target_modules is empty")
        if self.qkv_parts is not None:
            unknown = set(self.qkv_parts) - set(QKV_PARTS)
            if unknown or not self.qkv_parts:
                raise ValueError(f"qkv_parts must be a non-empty subset of {QKV_PARTS}, got {self.qkv_parts}")

    @property
    def scaling(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank


def qkv_part_rows(out_features: int, parts: Sequence[str], num_heads: int | None = None,
                  head_dim: int | None = None) -> dict[str, torch.Tensor]:
    """Output rows of a fused qkv Linear that belong to each part.

    Args:
        out_features: ``3 * dim`` of the fused Linear.
        parts: subset of ``("q", "k", "v")``.
        num_heads, head_dim: give both for the per-head interleaved layout (TinyViT:
            head h's rows are ``[q_h | k_h | v_h]``, each ``head_dim`` long); leave both None
            for the blocked layout ``[q | k | v]`` (SAM ViT).
    Returns:
        ``{part: LongTensor [dim]}`` of row indices, ascending.
    """
    if out_features % 3:
        raise ValueError(f"a fused qkv Linear has 3 * dim outputs, got {out_features}")
    dim = out_features // 3
    if (num_heads is None) != (head_dim is None):
        raise ValueError("give both num_heads and head_dim (interleaved layout) or neither (blocked layout)")
    rows = {}
    for part in parts:
        offset = QKV_PARTS.index(part)
        if num_heads is None:
            rows[part] = torch.arange(offset * dim, (offset + 1) * dim)
        else:
            if num_heads * head_dim != dim:
                raise ValueError(f"num_heads * head_dim = {num_heads * head_dim} != dim = {dim}")
            head_starts = torch.arange(num_heads) * 3 * head_dim + offset * head_dim  # [heads]
            rows[part] = (head_starts[:, None] + torch.arange(head_dim)[None, :]).reshape(-1)
    return rows


def qkv_rows_for_attention(attention: nn.Module, qkv: nn.Linear, parts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Row index per part for the ``qkv`` Linear owned by ``attention``, in that module's layout."""
    if isinstance(attention, WindowAttention):
        return qkv_part_rows(qkv.out_features, parts, num_heads=attention.num_heads, head_dim=attention.head_dim)
    # SAM's ImageEncoderViT Attention and standard ViTs split the fused output as q|k|v blocks.
    return qkv_part_rows(qkv.out_features, parts)


class LowRankUpdate(nn.Module):
    """``x -> x @ A^T @ B^T``, ``[..., in_features] -> [..., len(rows)]``, for some output rows.

    A starts kaiming-uniform and B at zero, so the update starts at exactly zero and the
    adapted model starts equal to the base model.

    Args:
        in_features: input size of the wrapped Linear.
        rank: r.
        rows: output rows of the wrapped Linear this update is added to (LongTensor), or
            None for all ``out_features`` rows.
        out_features: number of output rows when ``rows`` is None.
    """

    def __init__(self, in_features: int, rank: int, rows: torch.Tensor | None, out_features: int,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        num_rows = out_features if rows is None else rows.numel()
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(num_rows, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's own init, as peft does
        # Derived from the layout at injection, so not saved: checkpoints hold only A and B.
        if rows is not None:
            rows = rows.to(device=device if device is not None else rows.device, dtype=torch.long)
        self.register_buffer("rows", rows, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.A.t() @ self.B.t()

    def delta_weight(self) -> torch.Tensor:
        """``B @ A``: ``[len(rows), in_features]``."""
        return self.B @ self.A


class LoraLinear(AdapterLayer):
    """A frozen ``nn.Linear`` plus low-rank updates on all or some of its output rows.

    ``y = base(x)``, then for each update ``y[..., rows] += scaling * dropout(x) @ A^T @ B^T``.

    Args:
        base_layer: the Linear to adapt; its weight and bias are frozen here.
        rank, scaling, dropout: as in ``LoraConfig`` (``scaling = alpha / rank``).
        part_rows: ``{part: output rows}`` for separate updates on parts of a fused
            projection (``lora.q``, ``lora.v``), or None for one whole-output update
            (``lora.full``).
    """

    adapter_parameter_names = ("A", "B")

    def __init__(self, base_layer: nn.Linear, rank: int, scaling: float = 1.0, dropout: float = 0.0,
                 part_rows: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoraLinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base_layer.weight
        parts = {WHOLE_OUTPUT: None} if part_rows is None else part_rows
        for part, rows in parts.items():
            if rows is not None and (rows.min() < 0 or rows.max() >= base_layer.out_features):
                raise ValueError(f"rows of part {part!r} fall outside 0..{base_layer.out_features - 1}")
        self.lora = nn.ModuleDict({
            part: LowRankUpdate(base_layer.in_features, rank, rows, base_layer.out_features, w.device, w.dtype)
            for part, rows in parts.items()
        })

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        x_in = self.dropout(x)
        for update in self.lora.values():
            delta = update(x_in) * self.scaling
            # index_add (out of place) keeps autograd simple and handles both row layouts.
            y = y + delta if update.rows is None else y.index_add(-1, update.rows, delta)
        return y

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + scaling * B @ A`` placed on each update's rows: ``[out_features, in_features]``."""
        weight = self.base_layer.weight.detach().clone()
        for update in self.lora.values():
            delta = update.delta_weight() * self.scaling
            if update.rows is None:
                weight += delta
            else:
                weight.index_add_(0, update.rows, delta)
        return weight

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing what this layer computes (dropout aside).

        Its parameters keep the base layer's ``requires_grad`` flags (frozen after injection).
        """
        base = self.base_layer
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        merged.weight.copy_(self.merged_weight())
        merged.weight.requires_grad_(base.weight.requires_grad)
        if base.bias is not None:
            merged.bias.copy_(base.bias)
            merged.bias.requires_grad_(base.bias.requires_grad)
        return merged

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling}, parts={list(self.lora.keys())}"


def inject_lora(module: nn.Module, config: LoraConfig, root: str | None = "image_encoder") -> list[str]:
    """Wrap every target Linear under ``module.<root>`` in a ``LoraLinear``, in place.

    A target is an ``nn.Linear`` whose own name (last dotted component) is in
    ``config.target_modules``. Fused ``qkv`` targets get one update per ``config.qkv_parts``
    entry, on the rows the owning attention module uses for that part; other targets (and
    fused ones when ``qkv_parts`` is None) get one whole-output update. Base weights of the
    targets are frozen; nothing else changes (``adapters.base.mark_trainable`` decides the rest).

    Args:
        module: e.g. a ``SamBackbone``.
        config: ranks and targets.
        root: dotted name of the submodule to search (``"image_encoder"``, ``"mask_decoder"``),
            or None/"" for all of ``module``.
    Returns:
        Dotted names, relative to ``module``, of the wrapped Linears.
    Raises:
        ValueError: when no target matches.
    """
    search_root = module.get_submodule(root) if root else module

    def wrap(name: str, linear: nn.Linear) -> LoraLinear:
        part_rows = None
        if config.qkv_parts is not None and name.rpartition(".")[2] == FUSED_QKV_NAME:
            owner_name = name.rpartition(".")[0]
            owner = search_root.get_submodule(owner_name) if owner_name else search_root
            part_rows = qkv_rows_for_attention(owner, linear, config.qkv_parts)
        return LoraLinear(linear, config.rank, config.scaling, config.dropout, part_rows)

    return replace_layers(module, root, lambda name, layer: isinstance(layer, nn.Linear)
                          and name.rpartition(".")[2] in config.target_modules, wrap,
                          f"nn.Linear named {config.target_modules}")
