"""Segmentation from a user's prompts: the one path that MONAI Label, ``run inference``, the
tests and scripts use to segment slices from the boxes or clicks a user draws.

A user's prompts come in the pixels of a slice (x = column, y = row; boxes ``(x0, y0, x1, y1)``
with inclusive maxima), per class. :func:`segment_slice` fits the slice into the network's
square frame exactly as training did (``fit_to_square``), maps the prompts with the same
geometry (``SquareGeometry.to_square``), and returns the logits on the slice's own grid
(``square_logits_to_slice``). A class without a prompt is marked absent (``prompts["present"]``)
and never predicted; several boxes of one class (one per structure) give it the highest logit
over them (``SamSegmenter``).

* :func:`segment_slice_with_boxes` / :func:`segment_slice_with_points`: one 2-D slice, prompts
  keyed by class name or index 1..N;
* :class:`PromptedSliceInferer`: a volume and prompts in voxel indices (MONAI Label's request,
  :func:`prompts_from_request`): each click segments its slice, a 3-D box every slice k0..k1.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from monai.data import MetaTensor
from torch import nn

from medsaga_components.data.square_resize import fit_to_square, square_logits_to_slice
from medsaga_components.network import ABSENT_CLASS_LOGIT
from medsaga_components.prompts.from_labels import stack_class_boxes
from medsaga_components.inference.two_pass import unwrapped

USER_INPUTS = ("boxes", "points")
COORDINATES = {"boxes": 4, "points": 2}  # values per box (x0, y0, x1, y1) and per click (x, y)


def prompt_tensors(asked: Mapping[int, Sequence[Sequence[float]]], user_input: str, num_classes: int,
                   image_size: int) -> dict[str, torch.Tensor]:
    """``{class index 0..N-1: [box or click, ...]}`` in the ``image_size`` square frame -> the
    segmenter's prompts for a batch of one: ``boxes`` ``[1, N, 4]`` (``[1, N, K, 4]`` when a class
    has several) or ``points`` ``[1, N, P, 2]`` with ``point_labels`` (-1 padding), and ``present``.
    A class not asked gets the whole-image box or padding clicks, marked not present."""
    if user_input == "boxes":
        framed = {c: torch.as_tensor(v, dtype=torch.float32).reshape(-1, 4) for c, v in asked.items()}
        last = image_size - 1.0
        boxes, present = stack_class_boxes(framed, num_classes, fill=(0.0, 0.0, last, last))
        return {"boxes": boxes[None], "present": present[None]}
    p = max(len(v) for v in asked.values())
    points, labels = torch.zeros(1, num_classes, p, 2), torch.full((1, num_classes, p), -1, dtype=torch.long)
    for c, clicks in asked.items():
        points[0, c, :len(clicks)] = torch.as_tensor(clicks, dtype=torch.float32).reshape(-1, 2)
        labels[0, c, :len(clicks)] = 1
    return {"points": points, "point_labels": labels, "present": (labels == 1).any(dim=-1)}


def check_inside_slice(asked: Mapping[int, Sequence[Sequence[float]]], user_input: str, height: int, width: int,
                       class_names: Sequence[str]) -> None:
    """Refuse a box or click that leaves the ``width x height`` slice (or a reversed box), naming it."""
    for c, items in asked.items():
        for item in items:
            xs, ys = item[0::2], item[1::2]
            reversed_box = user_input == "boxes" and (item[2] < item[0] or item[3] < item[1])
            if reversed_box or min(xs) < 0 or min(ys) < 0 or max(xs) > width - 1 or max(ys) > height - 1:
                if user_input == "boxes":
                    raise ValueError(f"box {list(item)} of class {class_names[c]!r} is not inside the {width} x "
                                     f"{height} slice (expected 0 <= x0 <= x1 <= {width - 1}, 0 <= y0 <= y1 <= "
                                     f"{height - 1})")
                raise ValueError(f"click {list(item)} (x, y) of class {class_names[c]!r} lies outside the {width} x "
                                 f"{height} slice (x in 0..{width - 1}, y in 0..{height - 1})")


@torch.no_grad()
def segment_slice(network: nn.Module, image: torch.Tensor, asked: Mapping[int, Sequence[Sequence[float]]],
                  user_input: str, modality: str | int | None = None) -> torch.Tensor:
    """``[N + 1, H, W]`` logits of one slice from a user's prompts.

    Args:
        network: a prompted ``SamSegmenter`` (or a ``TwoPassSegmenter``) in eval mode.
        image: ``[C, H, W]`` intensities already scaled (the bundle's preprocessing).
        asked: ``{class index 0..N-1: [(x0, y0, x1, y1), ...] or [(x, y), ...]}`` in the slice's pixels.
        user_input: ``"boxes"`` or ``"points"``.
        modality: a modality name or index (MCP prompts); None: the network's default.
    """
    module = unwrapped(network)
    squares, geometry = fit_to_square(image[None].float(), module.image_size)  # [1, C, S, S]
    framed = {c: geometry.to_square(torch.as_tensor(v, dtype=torch.float32).reshape(-1, COORDINATES[user_input]))
              for c, v in asked.items()}
    device = next(module.parameters()).device
    prompts = {k: v.to(device) for k, v in prompt_tensors(framed, user_input, module.num_classes, module.image_size).items()}
    if modality is not None:
        prompts["modality"] = modality if isinstance(modality, str) else torch.tensor([int(modality)], device=device)
    return square_logits_to_slice(network(squares.to(device), prompts).float().cpu(), geometry)[0]


def _class_index(key: Any, class_names: Sequence[str], what: str) -> int:
    if isinstance(key, str) and not key.isdigit():
        if key not in class_names:
            raise ValueError(f"{what} for unknown class {key!r}; classes are {list(class_names)}")
        return class_names.index(key)
    index = int(key) - 1
    if not 0 <= index < len(class_names):
        raise ValueError(f"{what} for class index {key}; expected 1..{len(class_names)} ({list(class_names)})")
    return index


def per_class_prompts(given: Mapping[Any, Any] | Sequence[Any] | torch.Tensor, class_names: Sequence[str],
                      user_input: str) -> dict[int, list[list[float]]]:
    """A user's slice prompts keyed by class name or index 1..N (or one entry per class, None
    for none) -> ``{class index 0..N-1: [[...], ...]}``. A class may have one box or a list of
    boxes (one per structure); clicks are always a list of (x, y)."""
    what, width = ("box", 4) if user_input == "boxes" else ("clicks", 2)
    if isinstance(given, torch.Tensor):
        given = given.tolist()
    if not isinstance(given, Mapping):
        if len(given) != len(class_names):
            raise ValueError(f"expected {len(class_names)} {what}es (one per class {list(class_names)}, None for "
                             f"none), got {len(given)}")
        given = {i + 1: value for i, value in enumerate(given)}
    asked: dict[int, list[list[float]]] = {}
    for key, value in given.items():
        index = _class_index(key, class_names, what)
        if value is None:
            continue
        several = user_input == "points" or (len(value) > 0 and isinstance(value[0], (Sequence, torch.Tensor)))
        items = [[float(v) for v in item] for item in (value if several else [value])]
        if any(len(item) != width for item in items):
            shape = "(x0, y0, x1, y1) or a list of them" if user_input == "boxes" else "(x, y)"
            raise ValueError(f"{what} of class {key!r} must be {shape}, got {value!r}")
        if items:
            asked[index] = items
    if not asked:
        if user_input == "boxes":
            raise ValueError("box-prompted inference needs at least one box (x0, y0, x1, y1 in slice pixels)")
        raise ValueError("point-prompted inference needs at least one click (x, y in slice pixels); "
                         "without clicks, call the TwoPassPointSegmenter without prompts")
    return asked


def _segment_one_slice(network: nn.Module, image: torch.Tensor, given, class_names: Sequence[str] | None,
                       user_input: str, modality=None) -> tuple[torch.Tensor, torch.Tensor]:
    num_classes = unwrapped(network).num_classes
    names = list(class_names) if class_names is not None else [str(i + 1) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a network of {num_classes} classes")
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ValueError(f"expected a slice [H, W] or [C, H, W], got {tuple(image.shape)}")
    asked = per_class_prompts(given, names, user_input)
    check_inside_slice(asked, user_input, *image.shape[-2:], names)
    logits = segment_slice(network, image, asked, user_input, modality)
    return logits.argmax(dim=0), logits


def segment_slice_with_boxes(network: nn.Module, image: torch.Tensor, boxes, class_names: Sequence[str] | None = None,
                             modality: str | int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One 2-D slice from the user's boxes: ``[H, W]`` class indices (0 background) and ``[N + 1, H, W]``
    logits on the slice's grid.

    ``image``: ``[H, W]`` or ``[C, H, W]``, already scaled; ``boxes``: ``{class name or index 1..N:
    (x0, y0, x1, y1) or a list of them}`` in the slice's pixels, or one box (or None) per class;
    ``class_names``: the N foreground names (default ``"1".."N"``); ``modality``: a name or index
    (None: the one the model was trained with)."""
    return _segment_one_slice(network, image, boxes, class_names, "boxes", modality)


def segment_slice_with_points(network: nn.Module, image: torch.Tensor, clicks: Mapping[Any, Sequence[Sequence[float]]],
                              class_names: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One 2-D slice from the user's clicks, ``{class name or index 1..N: [(x, y), ...]}`` in the
    slice's pixels; returns as :func:`segment_slice_with_boxes`."""
    return _segment_one_slice(network, image, clicks, class_names, "points")


def in_plane_axes(axis: int) -> tuple[int, int]:
    """The (row, column) spatial axes of a slice taken along ``axis``."""
    rows, cols = [a for a in range(3) if a != axis]
    return rows, cols


class PromptedSliceInferer:
    """``[1, C, X, Y, Z]`` volume + a user's prompts in voxel indices -> ``[1, N + 1, X, Y, Z]`` logits.

    Prompts, per class index 1..N: clicks ``[[i, j, k], ...]`` (each segments its own slice), or
    a box ``[i0, j0, k0, i1, j1, k1]`` (every slice k0..k1, inclusive corners) or a list of such
    boxes (one per structure). Slices without prompts stay background; a class without a prompt
    on a slice has ``ABSENT_CLASS_LOGIT`` there.

    Args:
        image_size: S, the network's square input side.
        axis: the slicing axis (as the bundle's ``SquareSliceInferer``).
        prompt_input: ``"points"`` or ``"boxes"``.
        num_classes: N.
    """

    def __init__(self, image_size: int, axis: int, prompt_input: str, num_classes: int) -> None:
        if prompt_input not in USER_INPUTS:
            raise ValueError(f"prompt_input must be 'points' or 'boxes', got {prompt_input!r}")
        self.image_size, self.axis, self.prompt_input, self.num_classes = int(image_size), int(axis), prompt_input, num_classes

    def slices_of(self, prompts: Mapping[int, Sequence], shape: Sequence[int]) -> dict[int, dict[int, list]]:
        """``{slice index: {class index 1..N: [2-D points (x, y)] or [(x0, y0, x1, y1)]}}``; a prompt
        outside the volume or of an unknown class is an error naming it."""
        rows, cols = in_plane_axes(self.axis)
        per_slice: dict[int, dict[int, list]] = {}
        for cls, values in prompts.items():
            if not 1 <= int(cls) <= self.num_classes:
                raise ValueError(f"prompt for class {cls}: classes are 1..{self.num_classes}")
            several_boxes = len(values) > 0 and isinstance(values[0], Sequence)
            items = values if self.prompt_input == "points" or several_boxes else [values]
            for item in items:
                item = [float(v) for v in item]
                corners = [item] if self.prompt_input == "points" else [item[:3], item[3:]]
                if any(len(c) != 3 for c in corners):
                    raise ValueError(f"class {cls}: expected {'[i, j, k]' if self.prompt_input == 'points' else '[i0, j0, k0, i1, j1, k1]'} "
                                     f"voxel indices, got {item}")
                for c in corners:
                    if any(not 0 <= v <= n - 1 for v, n in zip(c, shape)):
                        raise ValueError(f"class {cls}: prompt {item} lies outside the volume of shape {tuple(shape)}")
                if self.prompt_input == "points":
                    s = int(round(item[self.axis]))
                    per_slice.setdefault(s, {}).setdefault(int(cls), []).append((item[cols], item[rows]))
                else:
                    lo, hi = corners
                    first, last = sorted((int(round(lo[self.axis])), int(round(hi[self.axis]))))
                    box = (min(lo[cols], hi[cols]), min(lo[rows], hi[rows]), max(lo[cols], hi[cols]), max(lo[rows], hi[rows]))
                    for s in range(first, last + 1):
                        per_slice.setdefault(s, {}).setdefault(int(cls), []).append(box)
        return per_slice

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], prompts: Mapping[int, Sequence]) -> torch.Tensor:
        if inputs.ndim != 5 or inputs.shape[0] != 1:
            raise ValueError(f"expected one volume [1, C, X, Y, Z], got {tuple(inputs.shape)}")
        volume = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        per_slice = self.slices_of(prompts, volume.shape[2:])
        if not per_slice:
            raise ValueError(f"prompted segmentation needs at least one {self.prompt_input[:-1]} (voxel indices)")
        dim = 2 + self.axis
        logits = volume.new_full((1, self.num_classes + 1, *volume.shape[2:]), ABSENT_CLASS_LOGIT, dtype=torch.float32)
        logits[:, 0] = 0.0
        for s, asked in sorted(per_slice.items()):
            image = volume.select(dim, s)[0].float()  # [C, H, W]
            framed = {cls - 1: items for cls, items in asked.items()}
            logits.select(dim, s).copy_(segment_slice(network, image, framed, self.prompt_input)[None])
        return logits


def label_value(key: Any, labels: Mapping[str, int]) -> int:
    """The class value a request names by ``key``: a label name of ``labels`` (``{name: value}``), or
    a value itself; anything else is an error naming it and the labels."""
    if str(key) in labels:
        return int(labels[str(key)])
    if str(key).isdigit() and int(key) in labels.values():
        return int(key)
    raise ValueError(f"prompt for unknown label {key!r}; labels are {dict(labels)}")


def prompts_from_request(request: Mapping[str, Any], labels: Mapping[str, int], prompt_input: str) -> dict[int, Any]:
    """MONAI Label's request prompts as ``{class index: ...}``.

    Points: one key per label name (MONAI Label's DeepEdit convention) with ``[[i, j, k], ...]``;
    boxes: ``request["boxes"] = {label name: [i0, j0, k0, i1, j1, k1]}``, or a list of such boxes
    per label (one per structure). Class indices are accepted in place of names.
    """
    if prompt_input == "boxes":
        boxes = request.get("boxes") or {}
        if not isinstance(boxes, Mapping):
            raise ValueError(f"'boxes' must be {{label: [i0, j0, k0, i1, j1, k1]}}, got {boxes!r}")
        return {label_value(k, labels): v for k, v in boxes.items()}
    return {labels[name]: request[name] for name in labels if request.get(name)}


__all__ = ["segment_slice", "segment_slice_with_boxes", "segment_slice_with_points", "per_class_prompts",
           "prompt_tensors", "PromptedSliceInferer", "prompts_from_request", "label_value", "in_plane_axes"]
