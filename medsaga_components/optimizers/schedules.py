"""Learning-rate schedules used by the bundles."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_poly_scheduler(optimizer: Optimizer, max_iterations: int, warmup_iterations: int = 0,
                          power: float = 0.9) -> LambdaLR:
    """Linear warmup to the base rate over ``warmup_iterations``, then ``(1 - t)^power`` decay.

    SAMed's schedule (warmup 250, poly 0.9), stepped once per iteration. Warmup is capped
    at half the run so that short few-shot runs still decay.
    """
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
    warmup = min(max(warmup_iterations, 0), max_iterations // 2)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, max_iterations - warmup)
        return max(0.0, 1.0 - progress) ** power

    return LambdaLR(optimizer, factor)
