"""Prompted segmentation of a volume, slice by slice, from the points or boxes a user draws.

A user's prompts come in voxel indices of the image array, per class::

    points: {class index: [[i, j, k], ...]}          each click segments its own slice
    boxes:  {class index: [i0, j0, k0, i1, j1, k1]}  every slice k0..k1 (inclusive corners),
            or a list of such boxes (one per structure: the left and the right amygdala)

Each slice with a prompt goes through the network the way training fed it (``fit_to_square``
into the S x S frame, the network's logits cropped and resized back with
``square_logits_to_slice``); the prompts go through the same scaling, as SAM's ``(x, y)`` =
(column, row) of the slice. A class without a prompt on a slice is marked absent
(``prompts["present"]``), so it is never predicted there; slices without prompts stay
background. Several boxes of one class on a slice go to the network as ``[1, N, K, 4]`` (its
logit is the highest over them, ``SamSegmenter``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from monai.data import MetaTensor

from medsaga_components.data.square_resize import fit_to_square, square_logits_to_slice
from medsaga_components.engine.label_prompts import stack_class_boxes

# The logit of a class that is not asked on a slice (SamSegmenter's ABSENT_CLASS_LOGIT).
NOT_ASKED = -1.0e4


def in_plane_axes(axis: int) -> tuple[int, int]:
    """The (row, column) spatial axes of a slice taken along ``axis``."""
    rows, cols = [a for a in range(3) if a != axis]
    return rows, cols


class PromptedSliceInferer:
    """``[1, C, X, Y, Z]`` volume + a user's prompts -> ``[1, N + 1, X, Y, Z]`` logits.

    Args:
        image_size: S, the network's square input side.
        axis: the slicing axis (as the bundle's ``SquareSliceInferer``).
        prompt_input: ``"points"`` or ``"boxes"``.
        num_classes: N.
    """

    def __init__(self, image_size: int, axis: int, prompt_input: str, num_classes: int) -> None:
        if prompt_input not in ("points", "boxes"):
            raise ValueError(f"prompt_input must be 'points' or 'boxes', got {prompt_input!r}")
        self.image_size, self.axis, self.prompt_input, self.num_classes = int(image_size), int(axis), prompt_input, num_classes

    def slices_of(self, prompts: Mapping[int, Sequence], shape: Sequence[int]) -> dict[int, dict[int, list]]:
        """``{slice index: {class index: [2-D points (x, y)] or [(x0, y0, x1, y1)]}}``; a prompt
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

    def _prompt_tensors(self, asked: Mapping[int, list], height: int, width: int, resized: tuple[int, int]) -> dict:
        """Prompts of one slice in the S x S frame, batch of one."""
        n = self.num_classes
        scale = torch.tensor([resized[1] / width, resized[0] / height])  # (x, y)
        last = self.image_size - 1.0
        if self.prompt_input == "points":
            p = max(len(v) for v in asked.values())
            points, labels = torch.zeros(1, n, p, 2), torch.full((1, n, p), -1, dtype=torch.long)
            present = torch.zeros(1, n, dtype=torch.bool)
            present[0, [cls - 1 for cls in asked]] = True
            for cls, clicks in asked.items():
                framed = ((torch.tensor(clicks, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(0.0, last)
                points[0, cls - 1, :len(clicks)] = framed
                labels[0, cls - 1, :len(clicks)] = 1
            return {"points": points, "point_labels": labels, "present": present}
        framed = {cls - 1: ((torch.tensor(class_boxes, dtype=torch.float32).view(-1, 2, 2) + 0.5) * scale - 0.5)
                  .clamp(0.0, last).view(-1, 4) for cls, class_boxes in asked.items()}
        boxes, present = stack_class_boxes(framed, n, fill=(0.0, 0.0, last, last))  # whole image: not asked
        return {"boxes": boxes[None], "present": present[None]}

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], prompts: Mapping[int, Sequence]) -> torch.Tensor:
        if inputs.ndim != 5 or inputs.shape[0] != 1:
            raise ValueError(f"expected one volume [1, C, X, Y, Z], got {tuple(inputs.shape)}")
        volume = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        per_slice = self.slices_of(prompts, volume.shape[2:])
        if not per_slice:
            raise ValueError(f"prompted segmentation needs at least one {self.prompt_input[:-1]} (voxel indices)")
        dim = 2 + self.axis
        logits = volume.new_full((1, self.num_classes + 1, *volume.shape[2:]), NOT_ASKED, dtype=torch.float32)
        logits[:, 0] = 0.0
        device = next(iter(getattr(network, "parameters", lambda: iter([torch.empty(0)]))())).device
        for s, asked in sorted(per_slice.items()):
            image = volume.select(dim, s).float()  # [1, C, H, W]
            h, w = image.shape[-2:]
            squares, geometry = fit_to_square(image, self.image_size)
            framed = self._prompt_tensors(asked, h, w, (geometry.resized_height, geometry.resized_width))
            out = network(squares.to(device), {k: v.to(device) for k, v in framed.items()})
            logits.select(dim, s).copy_(square_logits_to_slice(out.float().cpu(), geometry))
        return logits


def prompts_from_request(request: Mapping[str, Any], labels: Mapping[str, int], prompt_input: str) -> dict[int, Any]:
    """The request's prompts as ``{class index: ...}``.

    Points: one key per label name (MONAI Label's DeepEdit convention) with ``[[i, j, k], ...]``;
    boxes: ``request["boxes"] = {label name: [i0, j0, k0, i1, j1, k1]}``, or a list of such boxes
    per label (one per structure). Class indices are accepted in place of names.
    """
    def index_of(key: Any) -> int:
        if str(key) in labels:
            return labels[str(key)]
        if str(key).isdigit() and int(key) in labels.values():
            return int(key)
        raise ValueError(f"prompt for unknown label {key!r}; labels are {dict(labels)}")

    if prompt_input == "boxes":
        boxes = request.get("boxes") or {}
        if not isinstance(boxes, Mapping):
            raise ValueError(f"'boxes' must be {{label: [i0, j0, k0, i1, j1, k1]}}, got {boxes!r}")
        return {index_of(k): v for k, v in boxes.items()}
    return {labels[name]: request[name] for name in labels if request.get(name)}
