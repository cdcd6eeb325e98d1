"""Inference for box-prompted networks (mcp_medsam): from a user's boxes, or without boxes.

**From boxes** (MONAI Label sends them): :func:`segment_slice_with_boxes` takes one 2-D slice
and a box per class in the slice's own pixels, fits both into the network's square frame
exactly as training did, and returns the label map on the slice's grid. A class without a
box is not segmented. :class:`BoxPromptInferer` is the same as a MONAI inferer for batches
already in the square frame. Asking either for box-prompted inference without boxes is an
error; so is a box outside the slice.

**Without boxes**, in two passes (:func:`box_free_logits`): first every class gets the whole
image as its box (training shows the network such boxes, ``box_batches.McpPrepareBatch``
``whole_image_prob``), so each class is found from its class token alone; then each class's
box is the bounding box of its first-pass prediction, and the second pass segments from those
boxes, as from a user's. A class the first pass does not find is absent (never predicted).
:class:`TwoPassBoxSegmenter` is a ``SamSegmenter`` that does this whenever it is called
without boxes (the inference bundle's ``network_def``: same weights, same state-dict keys),
and :class:`TwoPassInferer` does it for any box-prompted network (validation).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.inferers import Inferer
from torch import nn

from ..config_values import as_bool
from ..data import SliceDataset
from ..data.modalities import modality_index
from ..data.square_resize import fit_to_square, square_logits_to_slice
from ..evaluation import evaluate_slice_dataset
from ..network import SamSegmenter
from ..prompts_mcp import McpPrompt
from .box_batches import McpPrepareBatch, whole_image_boxes
from .flips import with_test_time_flips
from .handlers import best_plain_model, has_test_slices
from .label_prompts import boxes_from_labels, check_prompted_slice, stack_class_boxes, unwrapped

logger = logging.getLogger(__name__)

TEST_BOXES = ("box_free", "ground_truth", "first_pass")


def image_embeddings(network: SamSegmenter, image: torch.Tensor) -> torch.Tensor:
    """The encoder's ``[B, D, h, w]`` for ``image``, resized to the network's side as its forward does."""
    size = network.image_size
    if tuple(image.shape[-2:]) != (size, size):
        image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
    return network.backbone.embed_images(image)


def box_free_logits(forward: Callable[..., torch.Tensor], image: torch.Tensor, num_classes: int, image_size: int,
                    prompts: Mapping[str, Any] | None = None,
                    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    per_structure: bool = False) -> torch.Tensor:
    """``[B, N + 1, H, W]`` logits of the second pass (see the module docstring).

    Args:
        forward: ``(image, prompts, **kw) -> logits`` of a box-prompted ``SamSegmenter``.
        image: ``[B, C, H, W]``; num_classes: N; image_size: S, the frame boxes are given in.
        prompts: other prompts for both passes (``modality``); boxes in it are refused.
        embed: ``image -> embeddings`` (:func:`image_embeddings`): the encoder then runs once and
            both passes decode its output (``forward(..., embeddings=)``); None: it runs per pass.
        per_structure: the second pass boxes each piece the first pass found (a network trained
            with a box per structure) instead of all of a class at once.
    """
    prompts = dict(prompts or {})
    if "boxes" in prompts:
        raise ValueError("box_free_logits finds the boxes itself; call the network with the boxes instead")
    b, _, h, w = image.shape
    reuse = {} if embed is None else {"embeddings": embed(image)}
    first = forward(image, {**prompts, "boxes": whole_image_boxes(b, num_classes, image_size, image_size,
                                                                    image.device)}, **reuse)
    boxes, present = boxes_from_labels(first.argmax(dim=1, keepdim=True), num_classes,
                                       per_structure=per_structure)  # in H x W pixels
    scale = torch.tensor([image_size / w, image_size / h] * 2)
    boxes = (boxes + 0.5) * scale - 0.5  # pixel centres of the H x W frame -> the S x S frame
    boxes = torch.minimum(boxes.clamp(min=0.0), torch.tensor([image_size - 1.0] * 4))
    return forward(image, {**prompts, "boxes": boxes.to(image.device), "present": present.to(image.device)}, **reuse)


class TwoPassBoxSegmenter(SamSegmenter):
    """A ``SamSegmenter`` with MCP-MedSAM's prompts that segments without boxes in two passes
    (:func:`box_free_logits`) and from boxes when ``prompts["boxes"]`` is given.

    Its parameters and buffers are the plain network's, so a bundle's ``models/model.pt``
    loads into it strictly (the switches and the default modality saved there included).

    Args:
        backbone, num_classes, checkpoint, image_size: as ``SamSegmenter``.
        modalities, default_modality, modality_prompt, content_prompt: ``McpPrompt``'s (the
            switches and the default modality are then overwritten by the weights loaded).
        modality: the modality of the images this network will segment (the inference bundle:
            the one dataset.json declares), used for every call that gives none; None: the
            model's default (the modality it was trained on).
        per_structure: box-free, box each structure the first pass finds (``box_free_logits``).
    """

    def __init__(self, backbone: str = "lite_medsam", num_classes: int = 1, checkpoint: str | None = "pretrained",
                 image_size: int | None = None, modalities: Sequence[str] | None = None,
                 default_modality: str | None = None, modality_prompt: bool = True,
                 content_prompt: bool = True, modality: str | None = None, per_structure: bool = False) -> None:
        from ..backbones import build_backbone

        sam = build_backbone(backbone, image_size=image_size, checkpoint=checkpoint)
        prompt = McpPrompt(num_classes, sam.prompt_encoder.embed_dim, modalities=modalities,
                           modality_prompt=modality_prompt, content_prompt=content_prompt,
                           default_modality=default_modality)
        super().__init__(sam, num_classes=num_classes, prompt=prompt)
        if modality is not None:
            modality_index(modality, prompt.modalities, where="modality")  # an undeclared one fails here
        self.modality = modality
        self.per_structure = as_bool(per_structure, "per_structure")

    def forward(self, image: torch.Tensor, prompts: Mapping[str, Any] | None = None) -> torch.Tensor:
        if self.modality is not None and (prompts is None or "modality" not in prompts):
            prompts = {**(prompts or {}), "modality": self.modality}
        if prompts is not None and "boxes" in prompts:
            return super().forward(image, prompts)
        return box_free_logits(super().forward, image, self.num_classes, self.image_size, prompts,
                               embed=lambda x: image_embeddings(self, x), per_structure=self.per_structure)


class TwoPassInferer(Inferer):
    """MONAI inferer: box-free two-pass logits of a box-prompted network (``prompts`` may hold
    the modality; boxes are found by the first pass; ``per_structure`` as ``box_free_logits``)."""

    def __init__(self, per_structure: bool = False) -> None:
        super().__init__()
        self.per_structure = as_bool(per_structure, "per_structure")

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any,
                 prompts: Mapping[str, Any] | None = None, **kwargs: Any) -> torch.Tensor:
        module = unwrapped(network)
        return box_free_logits(lambda image, p, **kw: network(image, p, **kw), inputs, module.num_classes,
                               module.image_size, prompts, embed=lambda x: image_embeddings(module, x),
                               per_structure=self.per_structure)


class BoxPromptInferer(Inferer):
    """MONAI inferer for a batch of square slices ``[B, C, S, S]`` with the user's boxes
    ``[B, N, 4]`` (x0, y0, x1, y1 in the S frame; ``present`` [B, N] marks the classes boxed)."""

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any,
                 prompts: Mapping[str, Any] | None = None, **kwargs: Any) -> torch.Tensor:
        if prompts is None or prompts.get("boxes") is None:
            raise ValueError("box-prompted inference needs boxes: pass prompts={'boxes': [B, N, 4] (x0, y0, x1, y1 "
                             "pixels), 'modality': ...}, or use TwoPassInferer for box-free inference")
        return network(inputs, prompts)


def _box_tensor(boxes: Mapping[Any, Sequence[float]] | Sequence[Sequence[float]] | torch.Tensor,
                class_names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``{class name or index 1..N: box}``, or N boxes (None for a class without one) ->
    (``[N, 4]`` boxes, ``[N]`` present); a class may have a list of boxes (one per structure),
    and then every class has K: (``[N, K, 4]``, ``[N, K]``)."""
    n = len(class_names)
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.tolist()
    if not isinstance(boxes, Mapping):
        if len(boxes) != n:
            raise ValueError(f"expected {n} boxes (one per class {list(class_names)}, None for none), got {len(boxes)}")
        boxes = {i + 1: box for i, box in enumerate(boxes)}
    per_class: dict[int, list] = {}
    for key, box in boxes.items():
        if isinstance(key, str) and not key.isdigit():
            if key not in class_names:
                raise ValueError(f"box for unknown class {key!r}; classes are {list(class_names)}")
            index = class_names.index(key)
        else:
            index = int(key) - 1
            if not 0 <= index < n:
                raise ValueError(f"box for class index {key}; expected 1..{n} ({list(class_names)})")
        if box is None:
            continue
        several = len(box) > 0 and isinstance(box[0], (Sequence, torch.Tensor))
        for one in (box if several else [box]):
            if len(one) != 4:
                raise ValueError(f"box of class {key!r} must be (x0, y0, x1, y1) or a list of them, got {box!r}")
            per_class.setdefault(index, []).append([float(v) for v in one])
    if not per_class:
        raise ValueError("box-prompted inference needs at least one box (x0, y0, x1, y1 in slice pixels)")
    return stack_class_boxes(per_class, n)


@torch.no_grad()
def segment_slice_with_boxes(network: nn.Module, image: torch.Tensor, boxes, class_names: Sequence[str] | None = None,
                             modality: str | int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment one 2-D slice from the user's boxes, as MONAI Label asks.

    Args:
        network: a box-prompted ``SamSegmenter`` (e.g. the bundle's ``TwoPassBoxSegmenter``), in eval mode.
        image: ``[H, W]`` or ``[C, H, W]`` intensities already scaled to [0, 1] (the bundle's
            preprocessing: ``ScaleIntensityForModalityd``).
        boxes: ``{class name or index: (x0, y0, x1, y1)}`` in the slice's pixels (x = column,
            y = row, inclusive), or one box (or None) per class; a list of boxes for a class
            boxes each of its structures (the class's logit is the highest over them).
        class_names: the N foreground class names (for name keys); default ``"1".."N"``.
        modality: a modality name or index; None: the one the model was trained with.
    Returns:
        ``[H, W]`` class indices (0 background) and ``[N + 1, H, W]`` logits on the slice's grid.
    """
    module, names, image = check_prompted_slice(network, image, class_names)
    box, present = _box_tensor(boxes, names)
    h, w = image.shape[-2:]
    x0, y0, x1, y1 = box[present].unbind(-1)
    outside = (x0 < 0) | (y0 < 0) | (x1 > w - 1) | (y1 > h - 1) | (x1 < x0) | (y1 < y0)
    if bool(outside.any()):
        where = tuple(torch.nonzero(present)[int(torch.nonzero(outside)[0])].tolist())  # (class, [box])
        raise ValueError(f"box {box[where].tolist()} of class {names[where[0]]!r} is not inside the {w} x {h} slice "
                         f"(expected 0 <= x0 <= x1 <= {w - 1}, 0 <= y0 <= y1 <= {h - 1})")
    squares, geometry = fit_to_square(image[None].float(), module.image_size)  # [1, C, S, S]
    scale = torch.tensor([geometry.resized_width / w, geometry.resized_height / h] * 2)
    square_boxes = ((box + 0.5) * scale - 0.5).clamp(min=0.0, max=module.image_size - 1.0)
    device = next(module.parameters()).device
    prompts = {"boxes": square_boxes[None].to(device), "present": present[None].to(device)}
    if modality is not None:
        prompts["modality"] = modality if isinstance(modality, str) else torch.tensor([int(modality)], device=device)
    logits = square_logits_to_slice(network(squares.to(device), prompts).float().cpu(), geometry)[0]
    return logits.argmax(dim=0), logits


class _WithPrompts(nn.Module):
    """``network`` called with fixed prompts that do not depend on the view (the modality), so
    that test-time flips (``FlipAveraged``) can mirror the image alone."""

    def __init__(self, network: nn.Module, prompts: Mapping[str, Any]) -> None:
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

    def predict(batch: dict) -> torch.Tensor:
        prompts = {k: v.to(device) for k, v in prepare.prompts(batch).items()}
        images = batch["image"].to(device)
        if boxes == "ground_truth":
            return network(images, prompts).float().cpu()
        if boxes == "first_pass":
            whole = whole_image_boxes(images.shape[0], module.num_classes, module.image_size, module.image_size, device)
            view = with_test_time_flips(_WithPrompts(network, {"modality": prompts["modality"], "boxes": whole}),
                                        test_time_flips)
            return view(images).float().cpu()
        view = with_test_time_flips(_WithPrompts(_box_free_network(network, module, per_structure),
                                                 {"modality": prompts["modality"]}), test_time_flips)
        return view(images).float().cpu()

    with torch.no_grad():
        return evaluate_slice_dataset(dataset, predict, output_dir, batch_size=batch_size, predict_from_batch=True)


def _box_free_network(network: nn.Module, module: SamSegmenter, per_structure: bool = False) -> nn.Module:
    """``network`` itself when it finds boxes on its own (``TwoPassBoxSegmenter``), else a
    module that runs the two passes with it."""
    if isinstance(module, TwoPassBoxSegmenter):
        return network
    return _TwoPass(network, per_structure)


class _TwoPass(nn.Module):
    def __init__(self, network: nn.Module, per_structure: bool = False) -> None:
        super().__init__()
        self.network = network
        self.inferer = TwoPassInferer(per_structure)

    def forward(self, image: torch.Tensor, prompts: Mapping[str, Any] | None = None) -> torch.Tensor:
        return self.inferer(image, self.network, prompts=prompts)


class EvaluateBoxPromptedOnTestVolumes:
    """When training completes: load the best plain model into ``network`` (a copy) and
    evaluate it on the test volumes with :func:`evaluate_box_prompted` (report, predictions
    and overlays in ``output_dir``, as ``EvaluateOnTestVolumes``)."""

    def __init__(self, network: nn.Module, model_path: str | Path, dataset: SliceDataset, output_dir: str | Path,
                 device: str | torch.device = "cpu", batch_size: int = 1, test_time_flips: bool = False,
                 boxes: str = "box_free", modalities: Sequence[str] | None = None, per_structure: bool = False) -> None:
        if boxes not in TEST_BOXES:
            raise ValueError(f"test boxes must be one of {TEST_BOXES}, got {boxes!r}")
        self.network, self.model_path, self.dataset = network, Path(model_path), dataset
        self.output_dir, self.device, self.batch_size = Path(output_dir), torch.device(device), batch_size
        self.test_time_flips, self.boxes, self.modalities = test_time_flips, boxes, modalities
        self.per_structure = as_bool(per_structure, "per_structure")

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> dict:
        network = best_plain_model(self.network, self.model_path)
        if not has_test_slices(self.dataset):
            return {}
        summary = evaluate_box_prompted(network.to(self.device), self.dataset, self.output_dir, self.device,
                                        self.batch_size, self.test_time_flips, self.boxes, self.modalities,
                                        self.per_structure)
        logger.info("test mean Dice %.4f (%s boxes%s) -> %s", summary["mean_dice"], self.boxes,
                    ", per structure" if self.per_structure else "", self.output_dir)
        return summary


__all__ = ["box_free_logits", "TwoPassBoxSegmenter", "TwoPassInferer", "BoxPromptInferer", "segment_slice_with_boxes",
           "evaluate_box_prompted", "EvaluateBoxPromptedOnTestVolumes", "TEST_BOXES"]
