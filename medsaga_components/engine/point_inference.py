"""Inference for point-prompted networks (cheap_lunch): from a user's clicks, or without clicks.

**From clicks** (MONAI Label sends them): :func:`segment_slice_with_points` takes one 2-D slice
and clicks per class in the slice's own pixels, fits both into the network's square frame
exactly as training did, and returns the label map on the slice's grid. A class without a
click is not segmented. A click outside the slice is an error naming it.

**Without clicks**, in two passes (:func:`point_free_logits`): first every class is asked by
its class token alone (``prompts.ClassPointPrompt``; training sends a share of the queries
without clicks, so the network knows this query); then each class is clicked where a user
would click it, in the middle of what the first pass found: the pixel of that class's
predicted region farthest from its border (``label_prompts.points_from_labels`` without a
generator, the same rule as the validation's ground-truth clicks). The second pass segments
from those clicks. A class the first pass does not find stays absent (never predicted).

:class:`TwoPassPointSegmenter` is a ``SamSegmenter`` that does this whenever it is called
without clicks (the inference bundle's ``network_def``: same weights, same state-dict keys);
:class:`AutomaticPoints` gives the same to the test evaluation (``test_points: automatic``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..data.square_resize import fit_to_square, square_logits_to_slice
from ..network import SamSegmenter
from ..prompts import ClassPointPrompt
from .label_prompts import points_from_labels, check_prompted_slice, unwrapped

TEST_POINTS = ("ground_truth", "automatic")


def point_free_logits(forward: Callable[..., torch.Tensor], image: torch.Tensor, num_classes: int, image_size: int,
                      points_per_class: int = 1) -> torch.Tensor:
    """``[B, N + 1, H, W]`` logits of the second pass (see the module docstring).

    Args:
        forward: ``(image, prompts) -> logits`` of a ``ClassPointPrompt`` network.
        image: ``[B, C, H, W]``; num_classes: N; image_size: S, the frame points are given in.
        points_per_class: clicks per class in the second pass.
    """
    first = forward(image, None)  # class tokens alone
    h, w = image.shape[-2:]
    points, point_labels = points_from_labels(first.argmax(dim=1, keepdim=True).cpu(), num_classes, points_per_class)
    points = (points + 0.5) * torch.tensor([image_size / w, image_size / h]) - 0.5  # H x W pixels -> S x S frame
    points = points.clamp(0.0, image_size - 1.0)
    present = (point_labels == 1).any(dim=-1)
    return forward(image, {"points": points.to(image.device), "point_labels": point_labels.to(image.device),
                           "present": present.to(image.device)})


class TwoPassPointSegmenter(SamSegmenter):
    """A cheap_lunch ``SamSegmenter`` (``ClassPointPrompt``) that segments without clicks in
    two passes (:func:`point_free_logits`) and from clicks when ``prompts["points"]`` is given.

    Its parameters are the plain network's, so a bundle's ``models/model.pt`` loads into it
    strictly. ``points_per_class``: clicks per class in the second pass.
    """

    def __init__(self, backbone: str = "lite_medsam", num_classes: int = 1, checkpoint: str | None = "pretrained",
                 image_size: int | None = None, points_per_class: int = 1) -> None:
        from ..backbones import build_backbone

        sam = build_backbone(backbone, image_size=image_size, checkpoint=checkpoint)
        super().__init__(sam, num_classes=num_classes, prompt=ClassPointPrompt(num_classes, sam.prompt_encoder.embed_dim))
        self.points_per_class = int(points_per_class)

    def forward(self, image: torch.Tensor, prompts: Mapping[str, Any] | None = None) -> torch.Tensor:
        if prompts is not None and prompts.get("points") is not None:
            return super().forward(image, prompts)
        return point_free_logits(super().forward, image, self.num_classes, self.image_size, self.points_per_class)


class AutomaticPoints:
    """For ``evaluate_test_volumes(prompts=...)``: each slice segmented without clicks, in two
    passes (``logits``), instead of from its ground-truth clicks."""

    def __init__(self, points_per_class: int = 1) -> None:
        self.points_per_class = int(points_per_class)

    def logits(self, network: nn.Module, image: torch.Tensor) -> torch.Tensor:
        module = unwrapped(network)
        return point_free_logits(network, image, module.num_classes, module.image_size, self.points_per_class)


def evaluation_points(kind: str, ground_truth: Any, points_per_class: int = 1) -> Any:
    """The test evaluation's clicks: ``"ground_truth"`` (``ground_truth``, a ``PromptsFromLabels``:
    the middle of each true structure, a user's clicks) or ``"automatic"`` (two passes)."""
    if kind not in TEST_POINTS:
        raise ValueError(f"test_points must be one of {TEST_POINTS}, got {kind!r}")
    return ground_truth if kind == "ground_truth" else AutomaticPoints(points_per_class)


def _click_tensors(clicks: Mapping[Any, Sequence[Sequence[float]]], class_names: Sequence[str],
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``{class name or index 1..N: [(x, y), ...]}`` -> (``[N, P, 2]`` points, ``[N, P]`` labels; -1 padding)."""
    n = len(class_names)
    per_class: dict[int, list] = {}
    for key, points in clicks.items():
        if isinstance(key, str) and not key.isdigit():
            if key not in class_names:
                raise ValueError(f"clicks for unknown class {key!r}; classes are {list(class_names)}")
            index = class_names.index(key)
        else:
            index = int(key) - 1
            if not 0 <= index < n:
                raise ValueError(f"clicks for class index {key}; expected 1..{n} ({list(class_names)})")
        points = [] if points is None else [list(p) for p in points]
        if any(len(p) != 2 for p in points):
            raise ValueError(f"each click of class {key!r} must be (x, y), got {points!r}")
        if points:
            per_class[index] = points
    if not per_class:
        raise ValueError("point-prompted inference needs at least one click (x, y in slice pixels); "
                         "without clicks, call the TwoPassPointSegmenter without prompts")
    p = max(len(v) for v in per_class.values())
    tensor, labels = torch.zeros(n, p, 2), torch.full((n, p), -1, dtype=torch.long)
    for index, points in per_class.items():
        tensor[index, :len(points)] = torch.tensor(points, dtype=torch.float32)
        labels[index, :len(points)] = 1
    return tensor, labels


@torch.no_grad()
def segment_slice_with_points(network: nn.Module, image: torch.Tensor, clicks: Mapping[Any, Sequence[Sequence[float]]],
                              class_names: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment one 2-D slice from the user's clicks, as MONAI Label asks.

    Args:
        network: a point-prompted ``SamSegmenter`` (e.g. the bundle's ``TwoPassPointSegmenter``), in eval mode.
        image: ``[H, W]`` or ``[C, H, W]`` intensities already scaled to [0, 1].
        clicks: ``{class name or index 1..N: [(x, y), ...]}`` in the slice's pixels (x = column, y = row).
        class_names: the N foreground class names (for name keys); default ``"1".."N"``.
    Returns:
        ``[H, W]`` class indices (0 background) and ``[N + 1, H, W]`` logits on the slice's grid.
    """
    module, names, image = check_prompted_slice(network, image, class_names)
    points, labels = _click_tensors(clicks, names)
    h, w = image.shape[-2:]
    x, y = points[..., 0], points[..., 1]
    outside = (labels == 1) & ((x < 0) | (y < 0) | (x > w - 1) | (y > h - 1))
    if bool(outside.any()):
        c, k = torch.nonzero(outside)[0].tolist()
        raise ValueError(f"click {points[c, k].tolist()} (x, y) of class {names[c]!r} lies outside the {w} x {h} "
                         f"slice (x in 0..{w - 1}, y in 0..{h - 1})")
    squares, geometry = fit_to_square(image[None].float(), module.image_size)  # [1, C, S, S]
    scale = torch.tensor([geometry.resized_width / w, geometry.resized_height / h])
    framed = ((points + 0.5) * scale - 0.5).clamp(0.0, module.image_size - 1.0)
    present = (labels == 1).any(dim=-1)
    device = next(module.parameters()).device
    prompts = {"points": framed[None].to(device), "point_labels": labels[None].to(device),
               "present": present[None].to(device)}
    logits = square_logits_to_slice(network(squares.to(device), prompts).float().cpu(), geometry)[0]
    return logits.argmax(dim=0), logits
