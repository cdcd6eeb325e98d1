"""Class weights for the loss, from the class frequencies of the few-shot labels.

Small structures are a few hundred of the 65,536 pixels of a 256 px slice; an unweighted
cross-entropy spends almost all of its gradient on the background. ``enet`` is the weighting
of ENet (Paszke et al., 2016): ``w_c = 1 / ln(1.02 + p_c)`` for class frequency ``p_c``,
which grows with rarity but stays bounded (between about 1.4 for a class that fills the slice
and 50 for an absent one), unlike plain inverse frequency.
"""

from __future__ import annotations

import math

import torch

from .dataset import SliceDataset

SCHEMES = ("enet",)


def class_frequencies(dataset: SliceDataset) -> torch.Tensor:
    """``[N + 1]`` share of each class index among the labelled pixels of ``dataset``'s slices,
    read as stored (at the network's side, without the dataset's random transforms)."""
    plain = SliceDataset(dataset.dataset, dataset.slices, dataset.image_size)
    plain._cache = dataset._cache  # the same volumes, read once
    counts = torch.zeros(dataset.num_classes, dtype=torch.float64)
    for index in range(len(plain)):
        counts += torch.bincount(plain[index]["label"].flatten(), minlength=dataset.num_classes).double()
    if counts.sum() == 0:
        raise ValueError("class_weights: the few-shot slices hold no labelled pixel")
    return counts / counts.sum()


def loss_class_weights(scheme: str | None, dataset: SliceDataset) -> torch.Tensor | None:
    """The bundles' ``class_weights`` key: None (unweighted) or ``"enet"``, whose ``[N + 1]``
    weights (background first, mean 1) come from ``dataset``'s labels."""
    if scheme is None or (isinstance(scheme, str) and scheme.strip().lower() in ("none", "null")):
        return None
    if scheme not in SCHEMES:
        raise ValueError(f"class_weights must be null or one of {SCHEMES}, got {scheme!r}")
    weights = torch.tensor([1.0 / math.log(1.02 + float(p)) for p in class_frequencies(dataset)])
    # mean 1: the Dice term (already balanced across classes) keeps its scale beside the CE term
    return (weights / weights.mean()).float()
