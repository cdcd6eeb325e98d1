"""The memory-efficient training mode: what makes MedSAGa's "less memory" true in practice.

GaLore alone only shrinks optimiser state. During a step a plain training loop also holds
every activation the forward saved for backward and a full-size gradient for every trained
weight. This mode removes those, each part behind its own switch in :class:`MemoryConfig`:

* ``activation_checkpointing``: each encoder segment (patch embedding, every block, every
  patch-merging step, the neck) keeps only its input during the forward and recomputes its
  activations when backward reaches it (``torch.utils.checkpoint``, non-reentrant), so at
  most one segment's activations exist at a time. The segment's ``forward`` is patched on
  the instance, so state_dict keys do not change and the patch can be removed. With several
  boxes per class, each decoder pass is checkpointed the same way
  (``SamSegmenter.checkpoint_box_passes``).
* ``layerwise_steps``: :class:`~medsaga_components.optimizers.layerwise.LayerwiseOptimizer`
  steps each parameter inside its post-accumulate-grad hook and drops the gradient there, so
  the full-size gradients of the whole network never coexist.
* ``frozen_without_grad``: an encoder segment with no trainable parameter and no input
  that needs a gradient (TinyViT's patch embedding and conv stage under MedSAGa and SAMed,
  SAM ViT's patch embedding) runs under ``torch.no_grad()``: it stores nothing for backward.
  A frozen TinyViT MBConv block then also runs its 4x-expanded hidden channels in groups
  (:func:`mbconv_forward_in_channel_groups`): at 256 px, batch 4, its whole expanded
  activations were the largest transient of the step (about 0.9 GB).
* ``chunked_attention``: SAM ViT's blocks compute their attention a few query rows at a time,
  each chunk checkpointed, so the N x N matrices never exist whole
  (``training/chunked_attention.py``); TinyViT's small windows are left as they are.

The training is numerically the plain mode's (tests/test_memory_efficient.py checks loss
curves, parameters and batch-norm statistics): checkpointing recomputes the same values
without updating batch-norm running statistics a second time, each parameter's update
depends only on its own gradient, and the grouped MBConv differs only in conv3's summation
order.

Usage (a bundle config calls the same function)::

    optimizer = build_optimizer("medsaga", network)
    optimizer = enable_memory_efficient_training(network, optimizer, {"layerwise_steps": True})

bfloat16 is not a memory switch but the bundle key ``bf16`` (``precision.use_bf16``), for every
method, in training and inference.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from medsaga_components._segment_anything import ImageEncoderViT
from medsaga_components.backbones.tiny_vit import MBConv, TinyViTEncoder
from medsaga_components.config_values import as_bool
from medsaga_components.forward_patch import ForwardPatch
from medsaga_components.optimizers.layerwise import LayerwiseOptimizer
from medsaga_components.training.chunked_attention import set_chunked_attention

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryConfig:
    """Switches of the memory-efficient training mode (all on by default).

    Args:
        activation_checkpointing: recompute each encoder segment's activations in backward.
        layerwise_steps: step each parameter as soon as its gradient is complete
            (:class:`LayerwiseOptimizer`); incompatible with gradient accumulation, gradient
            clipping and multi-process data parallel training.
        frozen_without_grad: frozen leading encoder segments run without autograd.
        chunked_attention: SAM ViT's attention in checkpointed chunks of query rows.
    """

    activation_checkpointing: bool = True
    layerwise_steps: bool = True
    frozen_without_grad: bool = True
    chunked_attention: bool = True

    @classmethod
    def off(cls) -> MemoryConfig:
        """The plain training mode: every switch off."""
        return cls(**{f.name: False for f in fields(cls)})

    @classmethod
    def parse(cls, value: MemoryConfig | Mapping[str, Any] | bool | None) -> MemoryConfig:
        """A config from what a JSON bundle config can hold.

        ``None`` or ``True``: every switch on; ``False``: every switch off; a mapping: the
        named switches (the others keep their defaults, i.e. on).
        """
        if isinstance(value, MemoryConfig):
            return value
        if isinstance(value, str):  # `--memory_efficient false` on the command line
            value = as_bool(value, "memory_efficient")
        if value is None or value is True:
            return cls()
        if value is False:
            return cls.off()
        if not isinstance(value, Mapping):
            raise TypeError(f"memory config must be a mapping, a bool or None, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            moved = " (bf16 is the bundle key `bf16` now, not a memory switch)" if "bf16_autocast" in unknown else ""
            raise ValueError(f"unknown memory config keys {unknown}; expected some of {sorted(known)}{moved}")
        not_bool = sorted(k for k, v in value.items() if not isinstance(v, bool))
        if not_bool:
            raise ValueError(f"memory config switches must be true or false: {not_bool}")
        return cls(**value)

    def as_dict(self) -> dict[str, bool]:
        return asdict(self)


# --- forward patches ---------------------------------------------------------------------

def _tensors_need_grad(args: Iterable[Any]) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _has_trainable_parameters(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


@contextlib.contextmanager
def _running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Batch norms under ``module`` in training mode normalise with batch statistics as usual
    but leave their running statistics as they are (the recomputation must not count twice).

    Momentum 0 keeps the running mean/var exactly (``r * 1 + batch * 0``) while the batch-norm
    call saves the same tensors for backward as in the first forward, which checkpointing
    checks; the step counter is put back afterwards.
    """
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _checkpoint_contexts(module: nn.Module) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), _running_stats_frozen(module)


class _SegmentForward(ForwardPatch):
    """One encoder segment's forward: checkpointed, or without autograd when it cannot need it.

    Args:
        module: the segment (input and output as its own ``forward``).
        checkpointed: recompute the segment's activations in backward.
        no_grad_when_frozen: run under ``torch.no_grad()`` when no parameter of the segment
            trains and no input tensor needs a gradient (decided on every call, so freezing
            or unfreezing later is respected).
    """

    def __init__(self, module: nn.Module, checkpointed: bool, no_grad_when_frozen: bool) -> None:
        super().__init__(module)
        self.checkpointed = checkpointed
        self.no_grad_when_frozen = no_grad_when_frozen

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = self.original_forward()
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        needs_grad = _has_trainable_parameters(self.module) or _tensors_need_grad([*args, *kwargs.values()])
        if not needs_grad:
            if not self.no_grad_when_frozen:
                return forward(*args, **kwargs)
            with torch.no_grad():
                if isinstance(self.module, MBConv) and self.previous is None and len(args) == 1 and not kwargs:
                    return mbconv_forward_in_channel_groups(self.module, args[0])
                return forward(*args, **kwargs)
        if self.checkpointed:
            return checkpoint(forward, *args, use_reentrant=False,
                              context_fn=partial(_checkpoint_contexts, self.module), **kwargs)
        return forward(*args, **kwargs)


def encoder_segments(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's sequential pieces in forward order: the units that are checkpointed.

    SAM ViT: patch embedding, every block, neck. TinyViT: patch embedding, every block of every
    stage (stage 0's MBConv blocks included) followed by that stage's patch merging, neck.
    (Splitting TinyViT's S/2 attention blocks into attention / local conv / MLP was measured at
    256 px: it lowers that stage's recomputation peak but the extra stored inputs raise the
    later stages' by nearly as much, so blocks stay whole.)
    """
    if isinstance(encoder, ImageEncoderViT):
        return [encoder.patch_embed, *encoder.blocks, encoder.neck]
    if isinstance(encoder, TinyViTEncoder):
        segments: list[nn.Module] = [encoder.patch_embed]
        for stage in encoder.layers:
            segments.extend(stage.blocks)
            if stage.downsample is not None:
                segments.append(stage.downsample)
        segments.append(encoder.neck)
        return segments
    raise TypeError(f"no segment layout known for encoder {type(encoder).__name__}")


# --- a frozen MBConv without its full expanded activations -----------------------------------

MBCONV_CHANNEL_GROUPS = 4


def mbconv_forward_in_channel_groups(block: MBConv, x: torch.Tensor, groups: int = MBCONV_CHANNEL_GROUPS) -> torch.Tensor:
    """``block(x)`` without autograd, holding 1/``groups`` of its expanded activations at a time.

    ``x``: ``[B, C, H, W]`` -> ``[B, C, H, W]``. MBConv expands C to 4C channels (TinyViT's stage
    0 at 256 px, batch 4: 268 MB per expanded tensor, and a few coexist). conv1 (1x1), conv2
    (depthwise) and their batch norms and GELUs treat every expanded channel separately, so
    they run on one channel group at a time, and each group's share of the 1x1 conv3 is summed.
    The result equals ``block(x)`` up to the summation order inside conv3; batch-norm running
    statistics are updated exactly as ``block(x)`` updates them.
    """
    hidden = block.conv1.c.out_channels
    step = -(-hidden // groups)
    total = None
    for start in range(0, hidden, step):
        channels = slice(start, min(start + step, hidden))
        first = start == 0
        y = F.conv2d(x, block.conv1.c.weight[channels], None, block.conv1.c.stride, block.conv1.c.padding)
        y = block.act1(_batch_norm_channels(block.conv1.bn, y, channels, count_batch=first))
        conv2 = block.conv2.c
        y = F.conv2d(y, conv2.weight[channels], None, conv2.stride, conv2.padding, conv2.dilation,
                     groups=channels.stop - channels.start)
        y = block.act2(_batch_norm_channels(block.conv2.bn, y, channels, count_batch=first))
        part = F.conv2d(y, block.conv3.c.weight[:, channels])
        total = part if total is None else total.add_(part)
    return block.act3(block.conv3.bn(total) + x)


def _batch_norm_channels(bn: nn.BatchNorm2d, y: torch.Tensor, channels: slice, count_batch: bool) -> torch.Tensor:
    """``bn`` applied to ``y``, which holds only ``channels`` of its input (``_BatchNorm.forward``
    restricted to a channel slice; the running statistics are updated through slice views)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        if count_batch:
            bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    buffers = not bn.training or bn.track_running_stats
    mean = bn.running_mean[channels] if buffers and bn.running_mean is not None else None
    var = bn.running_var[channels] if buffers and bn.running_var is not None else None
    weight = None if bn.weight is None else bn.weight[channels]
    bias = None if bn.bias is None else bn.bias[channels]
    return F.batch_norm(y, mean, var, weight, bias, use_batch_stats, factor, bn.eps)


def set_segment_forwards(encoder: nn.Module, checkpointed: bool, no_grad_when_frozen: bool) -> None:
    """Patch (or, with both switches off, un-patch) every segment of ``encoder`` in place."""
    for segment in encoder_segments(encoder):
        _SegmentForward.remove(segment)
        if checkpointed or no_grad_when_frozen:
            _SegmentForward(segment, checkpointed, no_grad_when_frozen).install()


# --- parameters the optimiser does not train ------------------------------------------------

def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def check_optimizer_holds_trainable(network: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Fail when a trainable parameter of ``network`` is not in ``optimizer``: it would get a
    full-size gradient that nothing reads. Which parameters train is the method's business
    (``methods.Method.mark_trainable``); its optimiser holds exactly those."""
    held = {id(p) for p in optimizer_parameters(optimizer)}
    missing = [name for name, p in network.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        raise ValueError(f"{len(missing)} trainable parameters are not in the optimiser (first: {missing[:3]}); "
                         "build the optimiser with medsaga_components.methods.build_optimizer")


# --- the entry point -------------------------------------------------------------------------

def enable_memory_efficient_training(network: nn.Module, optimizer: torch.optim.Optimizer,
                                     config: MemoryConfig | Mapping[str, Any] | bool | None = None,
                                     encoder_name: str = "backbone.image_encoder") -> torch.optim.Optimizer:
    """Switch ``network`` (in place) to the memory-efficient mode; returns the optimiser to use.

    Args:
        network: a :class:`~medsaga_components.network.SamSegmenter` (or any module with a SAM
            ViT or TinyViT encoder at ``encoder_name``).
        optimizer: the method's optimiser (``methods.build_optimizer``), not yet stepped.
        config: a :class:`MemoryConfig` or what :meth:`MemoryConfig.parse` accepts.
    Returns:
        a :class:`LayerwiseOptimizer` over the same groups when ``layerwise_steps`` is on,
        otherwise ``optimizer`` itself. Give the returned object to the trainer and to the
        LR scheduler.
    """
    config = MemoryConfig.parse(config)
    if config.layerwise_steps and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise ValueError("layerwise_steps cannot run under multi-process data parallel training (the steps "
                         "would use gradients before their all-reduce): set it to false in the multi-GPU config")
    check_optimizer_holds_trainable(network, optimizer)
    set_segment_forwards(network.get_submodule(encoder_name), config.activation_checkpointing,
                         config.frozen_without_grad)
    set_chunked_attention(network.get_submodule(encoder_name), config.chunked_attention)
    if hasattr(network, "checkpoint_box_passes"):  # SamSegmenter's decoder passes, one per box of a class
        network.checkpoint_box_passes = config.activation_checkpointing
    if config.layerwise_steps and not isinstance(optimizer, LayerwiseOptimizer):
        optimizer = LayerwiseOptimizer.from_optimizer(optimizer)
    on = [name for name, value in config.as_dict().items() if value]
    logger.info("memory-efficient training: %s", ", ".join(on) if on else "off (plain mode)")
    return optimizer


def disable_memory_efficient_training(network: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                                      encoder_name: str = "backbone.image_encoder") -> None:
    """Remove the forward patches (and a :class:`LayerwiseOptimizer`'s hooks) again.

    Frozen parameters stay frozen: ``requires_grad`` is the method's business.
    """
    set_segment_forwards(network.get_submodule(encoder_name), checkpointed=False, no_grad_when_frozen=False)
    set_chunked_attention(network.get_submodule(encoder_name), False)
    if hasattr(network, "checkpoint_box_passes"):
        network.checkpoint_box_passes = False
    if isinstance(optimizer, LayerwiseOptimizer):
        optimizer.remove_hooks()


__all__ = ["MemoryConfig", "LayerwiseOptimizer", "enable_memory_efficient_training",
           "disable_memory_efficient_training", "encoder_segments", "set_segment_forwards",
           "check_optimizer_holds_trainable", "optimizer_parameters", "mbconv_forward_in_channel_groups"]
