"""Choosing the model by what a user does with it: whole validation volumes, one 3-D box per structure.

The default validation of the box-mode bundles asks each validation slice with the tight
ground-truth box of every class on it, an oracle no user gives. A user drags one 3-D box per
structure and the volume is propagated from it (``inference.volume``), and a checkpoint that
fills tight boxes best need not be the one that propagates best. With
``configs/validate_box_3d.json`` each validation segments every validation volume the way
``run inference --prompts`` does, from one jittered 3-D box per structure (the same draw at every
validation), and the checkpoint with the best volume Dice is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
from monai.data import MetaTensor

from medsaga_components.evaluation.prompt_sources import dataset_volumes, user_boxes


def validation_volumes(dataset_json: str | Path) -> list[dict[str, torch.Tensor]]:
    """``[{"image": [1, X, Y, Z], "label": [1, X, Y, Z]}, ...]``: every labelled validation volume of a
    dataset.json, whole, read and scaled as ``medsaga prompt-sources`` reads them; the image keeps its
    path as dataset.json writes it (``meta["filename_or_obj"]``). Raises ValueError naming the file
    when it declares none."""
    try:
        volumes, *_ = dataset_volumes(str(dataset_json), "validation")
    except ValueError as exc:
        raise ValueError(f"{exc}: configs/validate_box_3d.json segments whole validation volumes, so "
                         f"dataset.json needs a 'validation' list of labelled volumes") from None
    return [{"image": MetaTensor(image.float(), meta={"filename_or_obj": name}),
             "label": torch.from_numpy(label)[None]} for name, (image, label, _, _) in volumes.items()]


class BoxRequestsFromLabels:
    """A MONAI ``prepare_batch`` for ``SquareSliceInferer``: each validation volume goes to the inferer
    with a request of one 3-D box per structure, the ground truth's bounding box with each side
    moved by up to ``jitter`` of its extent (a user's drag; ``evaluation.prompt_sources.user_boxes``).

    The draw is seeded per volume by ``seed`` alone, so every validation asks the same boxes and
    checkpoints are compared on equal prompts.
    """

    def __init__(self, class_names: Sequence[str], jitter: float = 0.05, seed: int = 0) -> None:
        if not 0.0 <= float(jitter) < 0.5:
            raise ValueError(f"validation box jitter must be in [0, 0.5) of the box's extent, got {jitter!r}")
        self.class_names = list(class_names)
        self.jitter = float(jitter)
        self.seed = int(seed)

    def request(self, label: torch.Tensor) -> Mapping:
        """``{"boxes": {class name: [[i0, j0, k0, i1, j1, k1], ...]}}`` for one ``[1, X, Y, Z]`` label."""
        boxes = user_boxes(label[0].cpu().numpy(), len(self.class_names), self.jitter, self.seed)
        return {"boxes": {self.class_names[c - 1]: class_boxes for c, class_boxes in boxes.items()}}

    def __call__(self, batchdata: Mapping, device: str | torch.device | None = None, non_blocking: bool = False,
                 **kwargs):
        image, label = batchdata["image"], batchdata["label"]
        if image.shape[0] != 1:
            raise ValueError(f"validation volumes are segmented one at a time; got a batch of {image.shape[0]} "
                             "(validate#dataloader#batch_size must be 1)")
        request = self.request(label[0])
        image = image.to(device=device, non_blocking=non_blocking, **kwargs)
        return image, label.to(device=device, non_blocking=non_blocking), (), {"prompts": request}


__all__ = ["validation_volumes", "BoxRequestsFromLabels"]
