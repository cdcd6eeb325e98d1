"""The test evaluation a training run ends with (and ``run evaluating`` repeats): the best plain
model on the held-out test volumes, Dice and HD95 per class and volume, NIfTI predictions,
overlays and a report (``evaluate_slice_dataset``).

How each slice is predicted depends on the method:

* prompt-free: the network itself, optionally at a zoom (``inference.zoom``) and averaged over
  the in-plane flips (``inference.flips``);
* points (cheap_lunch): ``prompts``, a ``PromptsFromLabels`` giving each slice's ground-truth
  clicks (the stand-in for a user's), or a ``TwoPassInferer`` finding them itself;
* boxes (mcp_medsam, box mode): ``boxes`` (:data:`TEST_BOXES`): box-free in two passes, the
  ground truth's tight boxes, or the first pass alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from ignite.engine import Engine, Events
from torch import nn

from medsaga_components.config_values import as_bool
from medsaga_components.data import SliceDataset
from medsaga_components.evaluation.pipeline import evaluate_slice_dataset
from medsaga_components.inference.flips import with_test_time_flips
from medsaga_components.inference.model import load_plain_model
from medsaga_components.inference.openvino_encoder import use_openvino
from medsaga_components.inference.two_pass import TwoPassInferer, unwrapped
from medsaga_components.inference.zoom import with_zoom, zoom_setting
from medsaga_components.precision import use_bf16
from medsaga_components.prompts.box_batches import McpPrepareBatch, whole_image_boxes

logger = logging.getLogger(__name__)

TEST_BOXES = ("box_free", "ground_truth", "first_pass")
TEST_POINTS = ("ground_truth", "automatic")


def evaluation_points(kind: str, ground_truth: Any, points_per_class: int = 1) -> Any:
    """The test evaluation's clicks: ``"ground_truth"`` (``ground_truth``, a ``PromptsFromLabels``:
    the middle of each true structure, a user's clicks) or ``"automatic"`` (two passes)."""
    if kind not in TEST_POINTS:
        raise ValueError(f"test_points must be one of {TEST_POINTS}, got {kind!r}")
    return ground_truth if kind == "ground_truth" else TwoPassInferer(points_per_class=points_per_class)


def has_test_slices(dataset: SliceDataset) -> bool:
    """False, with a log line, when there is nothing to test (a datalist given with its own
    validation volumes, ``train#dataset#data`` + ``validate#dataset#data``, declares no test)."""
    if len(dataset):
        return True
    logger.warning("no test slices (the dataset declares none): test evaluation skipped")
    return False


def evaluate_test_volumes(network: nn.Module, dataset: SliceDataset, output_dir: str | Path,
                          device: str | torch.device = "cpu", batch_size: int = 4,
                          test_time_flips: bool = False, prompts: Callable | None = None,
                          zoom: float | str = 1.0) -> dict:
    """Predict every slice with ``network`` in eval mode and evaluate per volume: its class
    logits [B, N + 1, S, S] are resized to each slice's grid, then argmax (the same
    ``square_logits_to_labels`` as ``run inference``).

    ``test_time_flips``: the logits averaged over the four in-plane flips (``FlipAveraged``).
    ``prompts``: for point/box methods, a ``prompts.from_labels.PromptsFromLabels`` whose
    ``prompts(labels)`` gives each slice's prompts from its ground truth (the stand-in for a
    user's clicks or boxes), or an object whose ``logits(network, images)`` finds them itself
    (``TwoPassInferer``); flips do not mirror prompts, so they cannot be combined.
    ``zoom``: a number > 1 or ``"structures"`` reads each slice at a higher scale
    (``inference.zoom.with_zoom``), for networks trained on the same crops; prompt-free only.
    """
    device = torch.device(device)
    test_time_flips = as_bool(test_time_flips, "test_time_flips")
    zoom = zoom_setting(zoom)
    if prompts is not None:
        if zoom != 1:
            raise ValueError("zoom cannot be combined with prompts (their pixels would not match the windows)")
        if test_time_flips:
            raise ValueError("test_time_flips cannot be combined with prompts (FlipAveraged does not mirror them): "
                             "set test_time_flips false for a prompted bundle")

        @torch.no_grad()
        def predict_prompted(batch: dict) -> torch.Tensor:
            if hasattr(prompts, "logits"):  # prompts found without the ground truth (two passes)
                return prompts.logits(network.eval(), batch["image"].to(device)).float().cpu()
            given = {k: v.to(device) for k, v in prompts.prompts(batch["label"]).items()}
            return network.eval()(batch["image"].to(device), given).float().cpu()

        return evaluate_slice_dataset(dataset, predict_prompted, output_dir, batch_size=batch_size,
                                      predict_from_batch=True)
    # eval(): batch norms (TinyViT's conv stage) must use their running statistics, not the
    # test batch's, and must not update them.
    network = with_test_time_flips(with_zoom(network.eval(), zoom), test_time_flips)

    @torch.no_grad()
    def predict(images: torch.Tensor) -> torch.Tensor:
        return network(images.to(device)).float().cpu()  # [B, N + 1, S, S] logits

    return evaluate_slice_dataset(dataset, predict, output_dir, batch_size=batch_size)


class _WithPrompts(nn.Module):
    """``network`` called with fixed prompts that do not depend on the view (the modality), so
    that test-time flips (``FlipAveraged``) can mirror the image alone."""

    def __init__(self, network: Callable[..., torch.Tensor], prompts: Mapping[str, Any]) -> None:
        super().__init__()
        self.network = network
        self.prompts = dict(prompts)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.network(image, self.prompts)


def evaluate_box_prompted(network: nn.Module, dataset: SliceDataset, output_dir: str | Path,
                          device: str | torch.device = "cpu", batch_size: int = 1, test_time_flips: bool = False,
                          boxes: str = "box_free", modalities: Sequence[str] | None = None,
                          per_structure: bool = False) -> dict:
    """``evaluate_test_volumes`` for box-prompted networks: every slice with its case's modality,
    and ``boxes`` ``"box_free"`` (two passes; the four in-plane flips averaged when
    ``test_time_flips``), ``"ground_truth"`` (each class's tight box from the label, the
    stand-in for a user's boxes; no flips: a box would have to be mirrored with its view) or
    ``"first_pass"`` (the whole image as every class's box, box-free inference without its
    second pass: what the second pass adds; flips as for ``"box_free"``). ``per_structure``:
    a box per structure of a class, from the label or from the first pass (``boxes_from_labels``)."""
    if boxes not in TEST_BOXES:
        raise ValueError(f"boxes must be one of {TEST_BOXES}, got {boxes!r}")
    device = torch.device(device)
    network = network.eval()
    module = unwrapped(network)
    prepare = McpPrepareBatch(module.num_classes, str(dataset.dataset.path), modalities=modalities,
                              boxes="labels" if boxes == "ground_truth" else "none", per_structure=per_structure)
    two_pass = TwoPassInferer(per_structure)

    def predict(batch: dict) -> torch.Tensor:
        prompts = {k: v.to(device) for k, v in prepare.prompts(batch).items()}
        images = batch["image"].to(device)
        if boxes == "ground_truth":
            return network(images, prompts).float().cpu()
        given = {"modality": prompts["modality"]}
        if boxes == "first_pass":
            given["boxes"] = whole_image_boxes(images.shape[0], module.num_classes, module.image_size,
                                               module.image_size, device)
            view = _WithPrompts(network, given)
        else:
            view = _WithPrompts(lambda image, p: two_pass(image, network, prompts=p), given)
        return with_test_time_flips(view, test_time_flips)(images).float().cpu()

    with torch.no_grad():
        return evaluate_slice_dataset(dataset, predict, output_dir, batch_size=batch_size, predict_from_batch=True)


class EvaluateOnTestVolumes:
    """When training completes: load the best plain model (a copy of ``network``) and evaluate it
    on the held-out test volumes, with :func:`evaluate_box_prompted` when ``boxes`` is given (a
    box-prompted method: one of :data:`TEST_BOXES`), else :func:`evaluate_test_volumes`
    (``test_time_flips``, ``prompts``, ``zoom``). ``bf16`` and ``openvino``: the bundle keys
    (``precision.py``, ``inference/openvino_encoder.py``), applied to the loaded copy. Report,
    predictions and overlays go to ``output_dir``; calling it returns the summary (``run evaluating``)."""

    def __init__(self, network: nn.Module, model_path: str | Path, dataset: SliceDataset, output_dir: str | Path,
                 device: str | torch.device = "cpu", batch_size: int = 4, test_time_flips: bool = False,
                 prompts: Callable | None = None, zoom: float | str = 1.0, boxes: str | None = None,
                 modalities: Sequence[str] | None = None, per_structure: bool = False,
                 bf16: str | bool = False, openvino: str | bool = False) -> None:
        if boxes is not None and boxes not in TEST_BOXES:
            raise ValueError(f"test boxes must be one of {TEST_BOXES}, got {boxes!r}")
        self.network, self.model_path, self.dataset = network, Path(model_path), dataset
        self.output_dir, self.device, self.batch_size = Path(output_dir), torch.device(device), batch_size
        self.test_time_flips, self.prompts, self.zoom = test_time_flips, prompts, zoom
        self.boxes, self.modalities = boxes, modalities
        self.per_structure = as_bool(per_structure, "per_structure")
        self.bf16, self.openvino = bf16, openvino

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> dict:
        network = load_plain_model(self.network, self.model_path, missing_ok=True).to(self.device)
        network = use_openvino(use_bf16(network, self.bf16), self.openvino)
        if not has_test_slices(self.dataset):
            return {}
        if self.boxes is None:
            summary = evaluate_test_volumes(network, self.dataset, self.output_dir, self.device, self.batch_size,
                                            self.test_time_flips, self.prompts, self.zoom)
            logger.info("test mean Dice %.4f -> %s", summary["mean_dice"], self.output_dir)
            return summary
        summary = evaluate_box_prompted(network, self.dataset, self.output_dir, self.device, self.batch_size,
                                        self.test_time_flips, self.boxes, self.modalities, self.per_structure)
        logger.info("test mean Dice %.4f (%s boxes%s) -> %s", summary["mean_dice"], self.boxes,
                    ", per structure" if self.per_structure else "", self.output_dir)
        return summary
