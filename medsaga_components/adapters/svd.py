"""S-SAM's singular-value adaptation: train a scale and a shift per singular value.

Each adapted weight W (``[out, in]``, or a conv weight ``[out, in/groups, kh, kw]`` read as
``[out, in/groups * kh * kw]``) is factorised once, ``W = U diag(s) V^T``, and replaced by

    W' = U diag(ReLU(a * s + b)) V^T

with ``U``, ``s``, ``V^T`` frozen and ``a`` (init 1) and ``b`` (init 0) trained, one of each
per singular value: ``2 * min(out, in)`` trainable numbers per weight. At ``a = 1, b = 0``,
``W' = W`` (s >= 0, so the ReLU is inert) and the adapted model equals the base model.

``U``, ``s`` and ``V^T`` are persistent buffers: a training checkpoint holds them, and
``inject_svd(..., decompose=False)`` builds the adapted layout without running an SVD so
that checkpoint loads straight back. ``adapters.base.merge_adapters`` folds ``W'`` into plain layers for export.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, replace_layers

# Encoder weights S-SAM adapts: SAM ViT (qkv, proj, lin1, lin2) and TinyViT (qkv, proj, fc1, fc2).
DEFAULT_SVD_TARGETS = ("qkv", "proj", "lin1", "lin2", "fc1", "fc2")
NECK_NAME = "neck"


@dataclass(frozen=True)
class SvdConfig:
    """Which encoder weights get singular-value scale/shift.

    Args:
        target_modules: names (last dotted component) of ``nn.Linear`` modules to adapt.
            Only Linears match: SAM's ``patch_embed.proj`` is a Conv2d and is left alone.
        include_neck: also adapt every ``nn.Conv2d`` under ``<root>.neck``.
    """

    target_modules: tuple[str, ...] = DEFAULT_SVD_TARGETS
    include_neck: bool = True


class SingularValueAdapter(AdapterLayer):
    """Frozen ``U, s, V^T`` of a 2-D weight with trainable ``scale`` (a) and ``shift`` (b).

    Buffers: ``U [out, k]``, ``singular_values [k]``, ``Vh [k, in]`` with ``k = min(out, in)``.
    Parameters: ``scale [k]`` (init 1), ``shift [k]`` (init 0).

    Args:
        weight_2d: ``[out, in]`` weight to factorise.
        decompose: False allocates the buffers (zeros) without an SVD, for loading a
            checkpoint that already holds them.
    """

    adapter_parameter_names = ("scale", "shift")

    def __init__(self, weight_2d: torch.Tensor, decompose: bool = True) -> None:
        super().__init__()
        out_features, in_features = weight_2d.shape
        k = min(out_features, in_features)
        dtype, device = weight_2d.dtype, weight_2d.device
        if decompose:
            # float64 keeps U diag(s) V^T within ~1e-7 of W after the cast back.
            u, s, vh = torch.linalg.svd(weight_2d.detach().to(torch.float64), full_matrices=False)
            u, s, vh = u.to(dtype), s.to(dtype), vh.to(dtype)
        else:
            u = torch.zeros(out_features, k, dtype=dtype, device=device)
            s = torch.zeros(k, dtype=dtype, device=device)
            vh = torch.zeros(k, in_features, dtype=dtype, device=device)
        self.register_buffer("U", u.contiguous())
        self.register_buffer("singular_values", s.contiguous())
        self.register_buffer("Vh", vh.contiguous())
        self.scale = nn.Parameter(torch.ones(k, dtype=dtype, device=device))
        self.shift = nn.Parameter(torch.zeros(k, dtype=dtype, device=device))

    @property
    def rank(self) -> int:
        return self.singular_values.numel()

    def adapted_singular_values(self) -> torch.Tensor:
        """``ReLU(a * s + b)``: ``[k]``."""
        return F.relu(self.scale * self.singular_values + self.shift)

    def adapted_weight_2d(self) -> torch.Tensor:
        """``U diag(ReLU(a * s + b)) V^T``: ``[out, in]``.

        Rebuilt every forward: its cost does not grow with batch size or token count,
        unlike applying the three factors to the activations.
        """
        return (self.U * self.adapted_singular_values()) @ self.Vh


def _frozen_bias(bias: torch.Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)


class SvdLinear(SingularValueAdapter):
    """``nn.Linear`` with weight ``U diag(ReLU(a * s + b)) V^T``; ``[..., in] -> [..., out]``.

    The base bias is kept as a frozen parameter ``bias``.
    """

    def __init__(self, base: nn.Linear, decompose: bool = True) -> None:
        super().__init__(base.weight, decompose)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.bias = _frozen_bias(base.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.adapted_weight_2d(), self.bias)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the adapted weight and the base bias."""
        weight = self.adapted_weight_2d()
        merged = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        merged.weight.copy_(weight)
        if self.bias is not None:
            merged.bias.copy_(self.bias)
        return merged

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class SvdConv2d(SingularValueAdapter):
    """``nn.Conv2d`` whose weight ``[out, in/groups, kh, kw]`` is ``U diag(ReLU(a*s+b)) V^T`` reshaped.

    ``[B, in, H, W] -> [B, out, H', W']`` with the base layer's stride, padding, dilation and groups.
    """

    def __init__(self, base: nn.Conv2d, decompose: bool = True) -> None:
        if base.padding_mode != "zeros":
            raise ValueError(f"SvdConv2d supports padding_mode='zeros' only, got {base.padding_mode!r}")
        super().__init__(base.weight.reshape(base.out_channels, -1), decompose)
        self.in_channels = base.in_channels
        self.out_channels = base.out_channels
        self.kernel_size = base.kernel_size
        self.stride = base.stride
        self.padding = base.padding
        self.dilation = base.dilation
        self.groups = base.groups
        self.weight_shape = tuple(base.weight.shape)
        self.bias = _frozen_bias(base.bias)

    def adapted_weight(self) -> torch.Tensor:
        """``[out, in/groups, kh, kw]``."""
        return self.adapted_weight_2d().reshape(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.adapted_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    @torch.no_grad()
    def merge(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding the adapted weight and the base bias."""
        weight = self.adapted_weight()
        merged = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                           padding=self.padding, dilation=self.dilation, groups=self.groups,
                           bias=self.bias is not None, device=weight.device, dtype=weight.dtype)
        merged.weight.copy_(weight)
        if self.bias is not None:
            merged.bias.copy_(self.bias)
        return merged

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, rank={self.rank}")


def inject_svd(module: nn.Module, config: SvdConfig, root: str | None = "image_encoder",
               decompose: bool = True) -> list[str]:
    """Replace the target Linears (and neck Conv2ds) under ``module.<root>`` in place.

    Args:
        module: e.g. a ``SamBackbone``.
        config: targets.
        root: dotted name of the encoder inside ``module``, or None/"" for ``module`` itself.
        decompose: False skips the SVDs and leaves zero buffers, to be filled by
            ``load_state_dict`` from an S-SAM checkpoint.
    Returns:
        Dotted names, relative to ``module``, of the replaced layers.
    Raises:
        ValueError: when nothing matches.
    """
    def matches(name: str, layer: nn.Module) -> bool:
        if isinstance(layer, nn.Linear):
            return name.rpartition(".")[2] in config.target_modules
        return config.include_neck and isinstance(layer, nn.Conv2d) and name.startswith(NECK_NAME + ".")

    def wrap(name: str, layer: nn.Module) -> SingularValueAdapter:
        return SvdLinear(layer, decompose) if isinstance(layer, nn.Linear) else SvdConv2d(layer, decompose)

    return replace_layers(module, root, matches, wrap, f"layer matching {config}")
