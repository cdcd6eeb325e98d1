"""bfloat16 where the hardware runs it natively: the image encoder under autocast, in training
and inference, with float32 weights, optimiser state and outputs.

On these CPUs (AMD EPYC with AVX-512 BF16) a 1024 x 1024 matmul runs at about 3x its float32
rate, and the image encoder holds nearly all of a step's FLOPs (one LiteMedSAM forward at 256 px
is 78 GFLOPs, the prompt encoder and mask decoder a small fraction). So only the encoder's
forward is autocast (``torch.autocast(device_type, dtype=torch.bfloat16)``) and its output is
cast back to float32: the decoder, the loss and every consumer of embeddings (two-pass and
volume inference, which call the encoder directly) see float32, weights stay float32 (autocast
casts copies per op), and optimisers never see bf16. Backward follows the forward's dtypes;
activation checkpointing recomputes a segment under the autocast state of its forward.

MONAI's ``SupervisedTrainer(amp=True)`` is not used: it autocasts on CUDA only and always
creates a GradScaler, which bf16 does not need (and whose ``step`` asserts on the per-layer
optimiser, whose gradients are consumed during backward).

The bundle key ``bf16``: ``"auto"`` turns it on where the device has native bf16 (CUDA:
``torch.cuda.is_bf16_supported()``; CPU: AVX-512 BF16 or AMX tiles, detected, not assumed),
``true`` forces it on (emulated, hence slower, where not native), ``false`` keeps float32.
The bundles default to ``false``: on this CPU bf16 makes training steps 1.5-1.8x and slices
1.4-1.6x faster, but it lowered test Dice by more than 0.005 on the small-structure demo, in
training and in inference alone (docs/memory_and_speed.md#bf16-on-cpus-that-have-it).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from medsaga_components.config_values import as_bool
from medsaga_components.forward_patch import ForwardPatch

logger = logging.getLogger(__name__)

AUTO = "auto"


def cpu_bf16_instructions() -> list[str]:
    """The native bf16 instruction sets this CPU has (``avx512_bf16``, ``amx``); empty if none."""
    found = []
    # torch's own cpuinfo probes (torch >= 2.1); private, hence guarded
    for name, probe in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx", "_is_amx_tile_supported")):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            found.append(name)
    return found


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 matmuls natively (not emulated through float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(cpu_bf16_instructions()) and torch.backends.mkldnn.is_available()
    return False


def is_auto(setting: Any) -> bool:
    """Whether a bundle switch (``bf16``, ``openvino``) is ``"auto"`` (or None): decided by the device."""
    return setting is None or (isinstance(setting, str) and setting.strip().lower() == AUTO)


def resolve_bf16(setting: Any, device: torch.device | str) -> bool:
    """The bundle key ``bf16`` (``"auto"``/None, true/false or their strings) for ``device``."""
    if is_auto(setting):
        return native_bf16(device)
    return as_bool(setting, "bf16 (expected auto, true or false)")


class EncoderAutocast(ForwardPatch):
    """The image encoder's forward under bfloat16 autocast on the input's device; float32 output."""

    def __call__(self, images: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            out = self.original_forward()(images, *args, **kwargs)
        return out.float()


def image_encoder_of(network: nn.Module, encoder_name: str = "backbone.image_encoder") -> nn.Module:
    """The image encoder of a ``SamSegmenter`` (also inside DistributedDataParallel's ``.module``)."""
    return getattr(network, "module", network).get_submodule(encoder_name)


def use_bf16(network: nn.Module, setting: Any = AUTO, encoder_name: str = "backbone.image_encoder") -> nn.Module:
    """Run ``network``'s image encoder under bf16 autocast when ``setting`` resolves to on for the
    device its parameters are on (see the module doc); off removes it again. Returns ``network``
    (in place), so a bundle config can write ``use_bf16(@network_def.to(@device), @bf16)``."""
    device = next(network.parameters()).device
    encoder = image_encoder_of(network, encoder_name)
    native, on = native_bf16(device), resolve_bf16(setting, device)
    EncoderAutocast.remove(encoder)
    if on:
        if not native:
            logger.warning("bf16 forced on for %s, which has no native bf16: it is emulated and slower than float32",
                           device)
        EncoderAutocast(encoder).install()
    where = f"CPU with {', '.join(cpu_bf16_instructions())}" if device.type == "cpu" and native else str(device)
    logger.info("image encoder precision: %s (bf16=%s, %s)", "bf16 autocast" if on else "float32", setting, where)
    return network


def uses_bf16(network: nn.Module, encoder_name: str = "backbone.image_encoder") -> bool:
    return EncoderAutocast.installed_on(image_encoder_of(network, encoder_name))


__all__ = ["AUTO", "EncoderAutocast", "cpu_bf16_instructions", "is_auto", "native_bf16", "resolve_bf16", "use_bf16", "uses_bf16"]
