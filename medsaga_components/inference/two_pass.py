"""Inference without a user's prompts for prompted networks, in two passes.

The first pass asks every class with a prompt that says nothing about where it is; the second
prompts each class from what the first pass found, the way a user would. What differs per
prompt kind is only the first pass (:class:`FirstPass`, one per ``PromptKind.user_input``):

* **boxes** (mcp_medsam, box mode): every class gets the whole image as its box (training shows
  the network such boxes, ``prompts.box_batches.McpPrepareBatch(whole_image_prob=...)``); then
  each class's box is the bounding box of its first-pass prediction (a box per structure with
  ``per_structure``, for a network trained with a box per structure);
* **points** (cheap_lunch): every class is asked by its class token alone
  (``prompts.ClassPointPrompt``; training sends a share of the queries without clicks); then
  each class is clicked in the middle of what the first pass found (the pixel farthest from its
  border, ``prompts.from_labels.points_from_labels`` without a generator, the rule of the
  validation's ground-truth clicks).

A class the first pass does not find is absent (never predicted). :class:`TwoPassSegmenter` is a
``SamSegmenter`` that does this whenever it is called without a user's prompts (the inference
bundles' ``network_def``: same weights, same state-dict keys); :class:`TwoPassInferer` does it
for any prompted network (validation, the test evaluation).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from torch import nn

from medsaga_components.config_values import as_bool
from medsaga_components.data.square_resize import SquareGeometry
from medsaga_components.modalities import modality_index
from medsaga_components.network import SamSegmenter
from medsaga_components.prompts import ClassPointPrompt, McpPrompt, PromptKind
from medsaga_components.prompts.box_batches import whole_image_boxes
from medsaga_components.prompts.from_labels import boxes_from_labels, points_from_labels


def unwrapped(network: nn.Module) -> nn.Module:
    """The network itself, also when DistributedDataParallel keeps it in ``.module``."""
    return getattr(network, "module", network)


def image_embeddings(network: SamSegmenter, image: torch.Tensor) -> torch.Tensor:
    """The encoder's ``[B, D, h, w]`` for ``image``, resized to the network's side as its forward does."""
    size = network.image_size
    if tuple(image.shape[-2:]) != (size, size):
        image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
    return network.backbone.embed_images(image)


class FirstPass:
    """What a prompt kind asks in the first pass, and how it prompts the second from the
    first pass's ``[B, 1, H, W]`` class map (both in the network's ``S x S`` frame)."""

    user_input: str = ""

    def ask_anywhere(self, batch_size: int, num_classes: int, image_size: int,
                     device: torch.device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def prompts_from(self, found: torch.Tensor, num_classes: int, geometry: SquareGeometry) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class BoxFirstPass(FirstPass):
    """Boxes: the whole image first, then the bounding box of each class (or structure) found."""

    user_input = "boxes"

    def __init__(self, per_structure: bool = False) -> None:
        self.per_structure = as_bool(per_structure, "per_structure")

    def ask_anywhere(self, batch_size, num_classes, image_size, device):
        return {"boxes": whole_image_boxes(batch_size, num_classes, image_size, image_size, device)}

    def prompts_from(self, found, num_classes, geometry):
        boxes, present = boxes_from_labels(found, num_classes, per_structure=self.per_structure)
        return {"boxes": geometry.to_square(boxes), "present": present}


class PointFirstPass(FirstPass):
    """Points: the class tokens alone first, then clicks in the middle of each class found."""

    user_input = "points"

    def __init__(self, points_per_class: int = 1) -> None:
        self.points_per_class = int(points_per_class)

    def ask_anywhere(self, batch_size, num_classes, image_size, device):
        return {}

    def prompts_from(self, found, num_classes, geometry):
        points, point_labels = points_from_labels(found.cpu(), num_classes, self.points_per_class)
        return {"points": geometry.to_square(points), "point_labels": point_labels,
                "present": (point_labels == 1).any(dim=-1)}


def first_pass_for(prompt: PromptKind, per_structure: bool = False, points_per_class: int = 1) -> FirstPass:
    """The first pass of a network's prompt kind; a kind a user gives nothing needs none (an error)."""
    if prompt.user_input == "boxes":
        return BoxFirstPass(per_structure)
    if prompt.user_input == "points":
        return PointFirstPass(points_per_class)
    raise ValueError(f"{type(prompt).__name__} takes no user prompts: call the network itself (one pass)")


def two_pass_logits(forward: Callable[..., torch.Tensor], image: torch.Tensor, num_classes: int, image_size: int,
                    first_pass: FirstPass, prompts: Mapping[str, Any] | None = None,
                    embed: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``[B, N + 1, H, W]`` logits of the second pass (see the module docstring).

    Args:
        forward: ``(image, prompts, **kw) -> logits`` of a prompted ``SamSegmenter``.
        image: ``[B, C, H, W]``; num_classes: N; image_size: S, the frame prompts are given in.
        first_pass: the prompt kind's :class:`FirstPass`.
        prompts: other prompts for both passes (``modality``); a user's boxes or points in it are refused.
        embed: ``image -> embeddings`` (:func:`image_embeddings`): the encoder then runs once and
            both passes decode its output (``forward(..., embeddings=)``); None: it runs per pass.
    """
    prompts = dict(prompts or {})
    if first_pass.user_input in prompts:
        raise ValueError(f"two-pass inference finds the {first_pass.user_input} itself; call the network with "
                         f"the {first_pass.user_input} instead")
    b, _, h, w = image.shape
    reuse = {} if embed is None else {"embeddings": embed(image)}
    first = forward(image, {**prompts, **first_pass.ask_anywhere(b, num_classes, image_size, image.device)} or None,
                    **reuse)
    # first-pass pixels (H x W) -> the S x S frame the prompts are read in
    geometry = SquareGeometry(h, w, image_size, image_size, image_size)
    second = first_pass.prompts_from(first.argmax(dim=1, keepdim=True), num_classes, geometry)
    return forward(image, {**prompts, **{k: v.to(image.device) for k, v in second.items()}}, **reuse)


class TwoPassSegmenter(SamSegmenter):
    """A prompted ``SamSegmenter`` that segments in two passes (:func:`two_pass_logits`) when it is
    called without the prompts a user gives its kind, and from them when they are given.

    Its parameters and buffers are the plain network's, so a bundle's ``models/model.pt`` loads
    into it strictly. The subclasses below only build the prompt kind from bundle keys.

    Args:
        backbone, num_classes, checkpoint, image_size: as ``SamSegmenter``.
        prompt: ``(num_classes, embed_dim) -> PromptKind`` (a ``PromptKind`` class, or a partial of
            one with its options), a kind whose ``user_input`` is ``"boxes"`` or ``"points"``.
        modality: the modality of the images this network will segment (MCP prompts), used for
            every call that gives none; None: the model's default (the modality it was trained on).
        per_structure, points_per_class: the first pass's (``BoxFirstPass``, ``PointFirstPass``).
    """

    def __init__(self, backbone: str = "lite_medsam", num_classes: int = 1, checkpoint: str | None = "pretrained",
                 image_size: int | None = None, prompt: Callable[[int, int], PromptKind] = McpPrompt,
                 modality: str | None = None, per_structure: bool = False, points_per_class: int = 1) -> None:
        from medsaga_components.backbones import build_backbone

        sam = build_backbone(backbone, image_size=image_size, checkpoint=checkpoint)
        prompt = prompt(num_classes, sam.prompt_encoder.embed_dim)
        super().__init__(sam, num_classes=num_classes, prompt=prompt)
        if modality is not None:
            if not isinstance(prompt, McpPrompt):
                raise ValueError(f"modality is a prompt of MCP-MedSAM's boxes only, not of {type(prompt).__name__}")
            modality_index(modality, prompt.modalities, where="modality")  # an undeclared one fails here
        self.modality = modality
        self.first_pass = first_pass_for(prompt, per_structure, points_per_class)

    def forward(self, image: torch.Tensor, prompts: Mapping[str, Any] | None = None,
                embeddings: torch.Tensor | None = None) -> torch.Tensor:
        if self.modality is not None and (prompts is None or "modality" not in prompts):
            prompts = {**(prompts or {}), "modality": self.modality}
        if prompts is not None and prompts.get(self.first_pass.user_input) is not None:
            return super().forward(image, prompts, embeddings=embeddings)
        embed = (lambda x: image_embeddings(self, x)) if embeddings is None else (lambda x: embeddings)
        return two_pass_logits(super().forward, image, self.num_classes, self.image_size, self.first_pass, prompts,
                               embed=embed)


class TwoPassBoxSegmenter(TwoPassSegmenter):
    """``TwoPassSegmenter`` with MCP-MedSAM's prompts (mcp_medsam, and the box mode of medsaga and
    samed). ``modalities``, ``default_modality``, ``modality_prompt``, ``content_prompt``:
    ``McpPrompt``'s (the switches and the default modality are then overwritten by the weights
    loaded); ``modality``, ``per_structure``: ``TwoPassSegmenter``'s."""

    def __init__(self, backbone: str = "lite_medsam", num_classes: int = 1, checkpoint: str | None = "pretrained",
                 image_size: int | None = None, modalities: Sequence[str] | None = None,
                 default_modality: str | None = None, modality_prompt: bool = True,
                 content_prompt: bool = True, modality: str | None = None, per_structure: bool = False) -> None:
        prompt = partial(McpPrompt, modalities=modalities, modality_prompt=modality_prompt,
                         content_prompt=content_prompt, default_modality=default_modality)
        super().__init__(backbone, num_classes, checkpoint, image_size, prompt=prompt, modality=modality,
                         per_structure=per_structure)


class TwoPassPointSegmenter(TwoPassSegmenter):
    """``TwoPassSegmenter`` with cheap_lunch's clicks plus class tokens (``ClassPointPrompt``);
    ``points_per_class``: clicks per class in the second pass."""

    def __init__(self, backbone: str = "lite_medsam", num_classes: int = 1, checkpoint: str | None = "pretrained",
                 image_size: int | None = None, points_per_class: int = 1) -> None:
        super().__init__(backbone, num_classes, checkpoint, image_size, prompt=ClassPointPrompt,
                         points_per_class=points_per_class)


class TwoPassInferer(Inferer):
    """MONAI inferer (validation, test evaluation): two-pass logits of any prompted network, the
    first pass chosen by its prompt kind. ``prompts`` may hold the modality; ``per_structure``,
    ``points_per_class``: the first pass's."""

    def __init__(self, per_structure: bool = False, points_per_class: int = 1) -> None:
        super().__init__()
        self.per_structure = as_bool(per_structure, "per_structure")
        self.points_per_class = int(points_per_class)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any,
                 prompts: Mapping[str, Any] | None = None, **kwargs: Any) -> torch.Tensor:
        module = unwrapped(network)
        if isinstance(module, TwoPassSegmenter):  # it finds its prompts on its own
            return network(inputs, prompts)
        first_pass = first_pass_for(module.prompt, self.per_structure, self.points_per_class)
        return two_pass_logits(lambda image, p, **kw: network(image, p, **kw), inputs, module.num_classes,
                               module.image_size, first_pass, prompts, embed=lambda x: image_embeddings(module, x))

    def logits(self, network: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """For ``evaluate_test_volumes(prompts=...)``: each slice segmented without a user's prompts."""
        return self(image, network)


__all__ = ["FirstPass", "BoxFirstPass", "PointFirstPass", "first_pass_for", "two_pass_logits", "image_embeddings",
           "TwoPassSegmenter", "TwoPassBoxSegmenter", "TwoPassPointSegmenter", "TwoPassInferer", "unwrapped"]
