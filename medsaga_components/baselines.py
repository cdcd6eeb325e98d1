"""Reference points for a few-shot run, on the same held-out test volumes and evaluation code.

* ``zero_shot_boxes``: pretrained LiteMedSAM, no training, boxes taken from the ground truth of
  each slice (an upper bound on what box prompting gives a user for free): one box per class,
  or (``boxes="structure"``) one per connected piece of a class, as a user boxes the left and
  the right amygdala of a class that merges both.
* ``unet_from_scratch``: MONAI's BasicUNet trained on the same k slices, for the same wall
  time a SAM method took, with the same augmentation, loss, CPU allocator setting and
  test-time flips.

``medsaga baseline zero_shot_boxes|unet_from_scratch DATASET_DIR OUT_DIR [--boxes structure]``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet

from .backbones import build_backbone
from medsaga_components.training.cpu_allocator import keep_freed_cpu_memory
from medsaga_components.training.experiment import FewShotExperiment
from medsaga_components.evaluation.test_volumes import evaluate_test_volumes
from medsaga_components.prompts.from_labels import boxes_from_labels
from .evaluation import evaluate_slice_dataset


BOX_PER = ("class", "structure")


@torch.no_grad()
def zero_shot_boxes(experiment: FewShotExperiment, out_dir: str | Path, boxes: str = "class") -> dict:
    """Evaluate pretrained LiteMedSAM prompted with ground-truth boxes per slice: one per class,
    or one per structure of a class (``prompts.from_labels.boxes_from_labels``).

    A pixel takes the class whose mask logit (the highest over its boxes) is highest among
    those above 0; classes absent from a slice get no box and cannot be predicted there.
    """
    if boxes not in BOX_PER:
        raise ValueError(f"boxes must be one of {BOX_PER}, got {boxes!r}")
    backbone = build_backbone("lite_medsam", image_size=experiment.image_size).eval()

    def predict(batch: dict) -> torch.Tensor:
        images, labels = batch["image"], batch["label"][:, 0]
        best = torch.zeros_like(labels, dtype=torch.float32)
        classes = torch.zeros_like(labels)
        for i in range(images.shape[0]):
            class_boxes, present = boxes_from_labels(labels[i:i + 1, None], experiment.num_classes,
                                                     per_structure=boxes == "structure")
            class_boxes, present = class_boxes.view(experiment.num_classes, -1, 4), present.view(experiment.num_classes, -1)
            for c in range(1, experiment.num_classes + 1):
                for box in class_boxes[c - 1][present[c - 1]]:
                    logits = backbone.predict_with_boxes(images[i:i + 1], box[None])[0, 0]
                    take = (logits > 0) & (logits > best[i])
                    classes[i][take] = c
                    best[i] = torch.maximum(best[i], logits)
        return classes

    return evaluate_slice_dataset(experiment.test_dataset, predict, out_dir, predict_from_batch=True)


def unet_from_scratch(experiment: FewShotExperiment, out_dir: str | Path, seconds: float, batch_size: int = 5,
                      lr: float = 1e-3, device: str = "cpu", test_time_flips: bool = False) -> dict:
    """Train BasicUNet on the few-shot slices for ``seconds`` of wall time, then evaluate
    (``test_time_flips``: as ``evaluate_test_volumes``)."""
    torch.manual_seed(0)
    network = BasicUNet(spatial_dims=2, in_channels=1, out_channels=experiment.num_classes + 1).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=0.01)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.2, lambda_dice=0.8)
    start, steps = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        for batch in experiment.train_loader(batch_size, steps_per_epoch=1):
            loss = loss_fn(network(batch["image"].to(device)), batch["label"].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
    summary = evaluate_test_volumes(network, experiment.test_dataset, out_dir, device, test_time_flips=test_time_flips)
    return {**summary, "training_steps": steps, "training_seconds": time.monotonic() - start}


def baseline_command(kind: str, dataset_dir: str, out: str, shots: float = 5, seed: int = 0, image_size: int = 256,
                     seconds: float = 600.0, batch_size: int = 2, rotation_degrees: float = 0.0,
                     spacing: str = "even", test_time_flips: bool = True, boxes: str = "class") -> dict:
    """Run one baseline and write its report into ``out`` (returns the mean Dice per class).

    ``seconds``, ``batch_size``, ``rotation_degrees`` (0: flips only) and ``test_time_flips``
    apply to ``unet_from_scratch``: the defaults are the medsaga bundle's; set ``seconds`` to
    the SAM run's training time. ``spacing``: how the few-shot slices are placed (``random`` or
    ``even``). ``boxes`` applies to ``zero_shot_boxes`` (``"class"`` or ``"structure"``). Like a bundle's training, the process keeps freed CPU memory for reuse."""
    if kind not in ("zero_shot_boxes", "unet_from_scratch"):
        raise ValueError(f"kind must be 'zero_shot_boxes' or 'unet_from_scratch', got {kind!r}")
    keep_freed_cpu_memory()
    experiment = FewShotExperiment(dataset_dir, out, shots=shots, seed=seed, image_size=image_size,
                                   rotation_degrees=rotation_degrees, spacing=spacing)
    if kind == "zero_shot_boxes":
        summary = zero_shot_boxes(experiment, out, boxes)
    else:
        summary = unet_from_scratch(experiment, out, seconds=seconds, batch_size=batch_size,
                                    test_time_flips=test_time_flips)
    return {c["name"]: round(c["mean_dice"], 4) for c in summary["per_class"]} | {"mean": round(summary["mean_dice"], 4)}
