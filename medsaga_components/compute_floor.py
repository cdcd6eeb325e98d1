"""The compute floor of a training step: the FLOPs it runs, at the rate this machine multiplies matrices.

A step cannot be faster than its matrix FLOPs divided by the GEMM rate of the dtype and threads
it runs with; how far a measured step is above that floor says how much time goes elsewhere
(elementwise ops, memory traffic, allocation, Python, GaLore's SVDs, which are not counted).

* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one whole step (forward, backward,
  optimiser step; recomputation under activation checkpointing included, as it really runs),
  split into the image encoder's (under bf16 autocast when that is on, see ``precision.py``)
  and the rest (float32). torch's own formula for a convolution's backward ignores ``groups``
  and counts TinyViT's depthwise convolutions about channels-fold (487 of 879 GFLOPs of a
  LiteMedSAM step at 256 px, batch 2); :func:`conv_backward_flops` counts each gradient as the
  forward convolution it is.
* GEMM rate: the best of a few ``n x n`` matmuls (``2 n^3`` FLOPs each) in float32 and in
  bfloat16, on the same device and threads.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

ENCODER_MODULE = "backbone.image_encoder"


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten.convolution_backward``: the input's gradient is a (transposed) convolution
    of the output's gradient with the same weights, the weight's gradient a convolution of the
    input with the output's gradient; each costs what the forward costs, grouped or not (the
    weight's shape ``[C_out, C_in / groups, k...]`` already holds the group split)."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_step_flops(step: Callable[[], None], root_name: str, encoder_name: str = ENCODER_MODULE) -> dict[str, int]:
    """``{"total": ..., "encoder": ...}``: FLOPs of one call of ``step``, the encoder's part
    (forward and backward) attributed by module. ``root_name``: the network's class name, as
    ``FlopCounterMode`` names modules (``"SamSegmenter"``)."""
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops}) as counter:
        step()
    counts = counter.get_flop_counts()
    encoder = sum(counts.get(f"{root_name}.{encoder_name}", {}).values())
    return {"total": int(counter.get_total_flops()), "encoder": int(encoder)}


def gemm_flops_per_second(dtype: torch.dtype, device: torch.device | str = "cpu", size: int = 1024,
                          repeats: int = 5) -> float:
    """The best rate of ``repeats`` ``size x size`` matmuls in ``dtype`` on ``device`` (this process's threads)."""
    device = torch.device(device)
    a = torch.rand(size, size, device=device).to(dtype)
    b = torch.rand(size, size, device=device).to(dtype)
    a @ b  # warm-up: kernel selection, first-touch pages
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def step_floor_seconds(flops: dict[str, int], rates: dict[str, float], bf16: bool) -> float:
    """Seconds the step's FLOPs take at the GEMM rates: the encoder's at the bf16 rate when it runs
    under bf16 autocast, everything else at the float32 rate."""
    encoder_rate = rates["bfloat16"] if bf16 else rates["float32"]
    return flops["encoder"] / encoder_rate + (flops["total"] - flops["encoder"]) / rates["float32"]


__all__ = ["conv_backward_flops", "count_step_flops", "gemm_flops_per_second", "step_floor_seconds"]
