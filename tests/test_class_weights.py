"""Class weights for the loss from the few-shot labels (``data.class_weights``)."""

import math

import numpy as np
import pytest
import torch

from medsaga_components.data import SliceDataset, fewshot_command, read_manifest
from medsaga_components.data.class_weights import class_frequencies, loss_class_weights
from medsaga_components.methods import build_loss


def test_frequencies_and_enet_weights_from_the_demo_slices(demo_dir, tmp_path):
    manifest = read_manifest(fewshot_command(str(demo_dir / "dataset.json"), 3, spacing="even",
                                             out=str(tmp_path / "m.json")))
    augmented = SliceDataset.from_manifest(manifest, "fewshot", 64, transform=lambda d: {**d, "label": d["label"] * 0})
    frequencies = class_frequencies(augmented)  # read as stored: the transform is not applied
    plain = SliceDataset.from_manifest(manifest, "fewshot", 64)
    counts = sum(np.bincount(plain[i]["label"].numpy().ravel(), minlength=3) for i in range(len(plain)))
    torch.testing.assert_close(frequencies, torch.tensor(counts / counts.sum()))
    weights = loss_class_weights("enet", augmented)
    expected = torch.tensor([1 / math.log(1.02 + float(p)) for p in frequencies])
    torch.testing.assert_close(weights, (expected / expected.mean()).float())
    order = frequencies.argsort()
    assert bool((weights[order].diff() < 0).all())  # the rarer the class, the larger its weight
    assert loss_class_weights(None, augmented) is None and loss_class_weights("null", augmented) is None
    with pytest.raises(ValueError, match="class_weights must be null or one of"):
        loss_class_weights("inverse", augmented)


def test_a_miss_on_the_rare_class_costs_more_when_weighted():
    target = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    target[0, 0, 3, 3] = 1  # one pixel of class 1; the prediction says background everywhere
    logits = torch.zeros(1, 3, 8, 8)
    logits[:, 0] = 4.0
    plain = build_loss("medsaga")(logits, target)
    weighted = build_loss("medsaga", torch.tensor([0.1, 1.45, 1.45]))(logits, target)
    assert weighted > plain
    with pytest.raises(ValueError, match="class_weights apply to the softmax loss"):
        build_loss("mcp_medsam", torch.ones(3))
