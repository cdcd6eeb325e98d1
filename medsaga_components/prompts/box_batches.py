"""MCP-MedSAM's ``prepare_batch``: box prompts from the labels plus each case's modality.

Training draws each class's box from the ground truth with jitter (MedSAM's box noise) and,
with probability ``whole_image_prob``, gives a class the whole image as its box instead, so
that the network also learns the first pass of box-free inference (``inference.two_pass``): find
the class anywhere, told only by its class token. Validation and test take the tight
ground-truth boxes (the stand-in for a user's boxes) or no boxes at all (box-free).

The modality of a sample is its case's, looked up by the sample's ``volume`` (the image
path as dataset.json writes it; ``data.decathlon.case_modalities``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from medsaga_components.data.decathlon import case_modalities
from medsaga_components.modalities import MODALITIES
from medsaga_components.prompts.from_labels import PromptsFromLabels

BOX_SOURCES = ("labels", "none")


def whole_image_boxes(batch_size: int, num_classes: int, height: int, width: int,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """``[B, N, 4]`` boxes ``(0, 0, W - 1, H - 1)``: every class asked anywhere in the image."""
    return torch.tensor([0.0, 0.0, width - 1.0, height - 1.0], device=device).repeat(batch_size, num_classes, 1)


class McpPrepareBatch:
    """A MONAI ``prepare_batch``: ``batch -> (image, label, (), {"prompts": {...}})`` with
    ``boxes`` and ``present`` (``boxes="labels"``) and ``modality`` ``[B]`` indices.

    Args:
        num_classes: N, foreground classes.
        dataset_json: the dataset the samples come from (gives each case's modality).
        modalities: the network's modality vocabulary (``McpPrompt.modalities``).
        boxes: ``"labels"``: from the ground truth; ``"none"``: modality only (box-free
            inference finds the boxes, ``inference.two_pass.TwoPassInferer``).
        jitter: box-edge noise as a fraction of the box's side (training; needs ``seed``).
        whole_image_prob: per image and class, the chance of the whole-image box instead
            (training; needs ``seed``).
        seed: None for the deterministic tight boxes (validation, test); an int for the
            seeded random jitter and whole-image boxes of training.
        per_structure: a box per structure of a class (``[B, N, K, 4]``, see
            ``prompts.from_labels.boxes_from_labels``), as a user boxes the left and the right
            structure of a class that merges both; a whole-image box replaces all of them.
        absent_box_prob: per image and class absent from it, the chance that it is still asked,
            with a random box (5 to 30 % of the image's side), and must answer "nothing here"
            (training; needs ``seed``). Propagation through a volume stops only where the model
            says a structure has ended; a model that only ever saw boxes around its structure
            keeps answering (docs/prompted_volumes.md). This project's addition.
        expand: each side of each box moved outward by a uniform random share of up to ``expand``
            of the box's side, after the jitter (training; needs ``seed``): the object may be
            smaller than its box, never cut by it. Propagation through a volume asks each slice
            with the box of its neighbour's prediction, which near a structure's end is larger
            than the structure; a model trained only on tight boxes fills whatever box it gets,
            and the prediction then never shrinks (docs/results.md, lung tumour).
    """

    def __init__(self, num_classes: int, dataset_json: str, modalities: Sequence[str] | None = None,
                 boxes: str = "labels", jitter: float = 0.0, whole_image_prob: float = 0.0,
                 seed: int | None = None, per_structure: bool = False, absent_box_prob: float = 0.0,
                 expand: float = 0.0) -> None:
        if boxes not in BOX_SOURCES:
            raise ValueError(f"boxes must be one of {BOX_SOURCES}, got {boxes!r}")
        if not 0.0 <= float(whole_image_prob) <= 1.0:
            raise ValueError(f"whole_image_prob must be in [0, 1], got {whole_image_prob!r}")
        self.num_classes = int(num_classes)
        self.modality_of = case_modalities(dataset_json, MODALITIES if modalities is None else modalities)
        self.dataset_json = str(dataset_json)
        self.boxes = boxes
        self.whole_image_prob = float(whole_image_prob) if seed is not None else 0.0
        if not 0.0 <= float(absent_box_prob) <= 1.0:
            raise ValueError(f"absent_box_prob must be in [0, 1], got {absent_box_prob!r}")
        self.absent_box_prob = float(absent_box_prob) if seed is not None else 0.0
        if not 0.0 <= float(expand) <= 1.0:
            raise ValueError(f"expand must be in [0, 1] (a share of the box's side), got {expand!r}")
        self.expand = float(expand) if seed is not None else 0.0
        self.from_labels = PromptsFromLabels("boxes", self.num_classes, jitter=jitter, seed=seed,
                                             per_structure=per_structure)
        self.generator = None if seed is None else torch.Generator().manual_seed(int(seed) + 1)

    def modality(self, volumes: Sequence[str]) -> torch.Tensor:
        """``[B]`` modality indices of the samples' volumes."""
        missing = sorted({v for v in volumes if v not in self.modality_of})
        if missing:
            raise ValueError(f"{self.dataset_json} does not list the volumes {missing[:3]}: no modality for them")
        return torch.tensor([self.modality_of[v] for v in volumes], dtype=torch.long)

    def prompts(self, batchdata: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The prompts of a collated batch (needs ``volume``, and ``label`` for boxes from labels)."""
        if "volume" not in batchdata:
            raise ValueError("McpPrepareBatch needs the samples' 'volume' (SliceDataset gives it) to know their "
                             "modality")
        volumes = batchdata["volume"]
        prompts = {"modality": self.modality([volumes] if isinstance(volumes, str) else list(volumes))}
        if self.boxes == "labels":
            if "label" not in batchdata:
                raise ValueError("McpPrepareBatch(boxes='labels') needs a 'label' in the batch to derive boxes from")
            labels = batchdata["label"]
            drawn = self.from_labels.prompts(labels.cpu())
            boxes, present = drawn["boxes"], drawn["present"]
            if self.expand > 0:
                boxes = self._expand(boxes, *labels.shape[-2:])
            if self.whole_image_prob > 0:
                b, n = boxes.shape[:2]
                whole = torch.rand(b, n, generator=self.generator) < self.whole_image_prob
                full = whole_image_boxes(b, n, *labels.shape[-2:])
                if boxes.ndim == 4:  # per structure: the first box becomes the whole image, the others go
                    whole = whole & present.any(dim=-1)
                    boxes[:, :, 0] = torch.where(whole[..., None], full, boxes[:, :, 0])
                    present = present & ~(whole[..., None] & (torch.arange(boxes.shape[2]) > 0))
                else:
                    boxes = torch.where((whole & present)[..., None], full, boxes)
            if self.absent_box_prob > 0:
                boxes, present = self._ask_absent(boxes, present, *labels.shape[-2:])
            prompts.update(boxes=boxes, present=present)
        return prompts

    def _expand(self, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``boxes`` ``[..., 4]`` grown outward side by side (``expand``), clamped to the image."""
        side = (boxes[..., 2:] - boxes[..., :2] + 1.0).repeat(*([1] * (boxes.ndim - 1)), 2)  # w, h, w, h
        grow = torch.rand(boxes.shape, generator=self.generator) * self.expand * side
        grown = boxes + grow * torch.tensor([-1.0, -1.0, 1.0, 1.0])
        return torch.minimum(grown.clamp(min=0.0), torch.tensor([width - 1.0, height - 1.0] * 2))

    def _ask_absent(self, boxes: torch.Tensor, present: torch.Tensor, height: int,
                    width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Give a share of the absent classes a random box and mark them asked (``absent_box_prob``)."""
        absent = ~(present.any(dim=-1) if present.ndim == 3 else present)  # [B, N]
        ask = absent & (torch.rand(absent.shape, generator=self.generator) < self.absent_box_prob)
        if not bool(ask.any()):
            return boxes, present
        b, n = absent.shape
        side = torch.rand(b, n, 2, generator=self.generator) * 0.25 + 0.05  # of the image's (w, h)
        size = side * torch.tensor([width - 1.0, height - 1.0])
        corner = torch.rand(b, n, 2, generator=self.generator) * (torch.tensor([width - 1.0, height - 1.0]) - size)
        random_boxes = torch.cat([corner, corner + size], dim=-1)  # [B, N, 4]
        boxes, present = boxes.clone(), present.clone()
        if boxes.ndim == 4:  # per structure: the first slot asks
            boxes[:, :, 0] = torch.where(ask[..., None], random_boxes, boxes[:, :, 0])
            present[:, :, 0] |= ask
        else:
            boxes = torch.where(ask[..., None], random_boxes, boxes)
            present = present | ask
        return boxes, present

    def __call__(self, batchdata: Mapping[str, Any], device: str | torch.device | None = None,
                 non_blocking: bool = False, **kwargs: Any):
        image = batchdata["image"].to(device=device, non_blocking=non_blocking, **kwargs)
        label = batchdata["label"].to(device=device, non_blocking=non_blocking, **kwargs) \
            if "label" in batchdata else None
        prompts = {k: v.to(device=device, non_blocking=non_blocking) for k, v in self.prompts(batchdata).items()}
        return image, label, (), {"prompts": prompts}

    def __repr__(self) -> str:
        return (f"McpPrepareBatch(num_classes={self.num_classes}, boxes={self.boxes!r}, "
                f"jitter={self.from_labels.jitter}, whole_image_prob={self.whole_image_prob}, "
                f"seed={self.from_labels.seed}, per_structure={self.from_labels.per_structure})")


__all__ = ["McpPrepareBatch", "whole_image_boxes", "BOX_SOURCES"]
