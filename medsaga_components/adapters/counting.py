"""Parameter counts, for reports and for checking a method trains what its paper says."""

from __future__ import annotations

from torch import nn


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters in ``module`` (shared tensors counted once).

    Buffers (SVD factors, position encodings) are not parameters and are not counted.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def parameter_breakdown(module: nn.Module, trainable_only: bool = True) -> dict[str, int]:
    """``{direct child name: count}`` plus ``"(own)"`` for parameters held by ``module`` itself
    and ``"total"``; children with no counted parameters are left out."""
    counts = {name: count_parameters(child, trainable_only) for name, child in module.named_children()}
    counts = {name: n for name, n in counts.items() if n}
    own = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad or not trainable_only)
    if own:
        counts["(own)"] = own
    counts["total"] = count_parameters(module, trainable_only)
    return counts
