"""Per-class prompts (points, boxes) derived from a label map, and the ``prepare_batch`` that
feeds them to MONAI's trainer and evaluator.

Prompted methods (cheap_lunch: points; mcp_medsam: boxes) ask one query per foreground
class. In training the prompts are drawn from the ground truth (random points inside each
class, jittered boxes); at validation and test the deterministic ground-truth prompts stand
in for a user's clicks or boxes (a click in the middle of each structure, its tight box).

Coordinates are pixels of the label's own ``[H, W]`` frame, SAM's convention: ``x`` is the
column, ``y`` the row; boxes are ``(x0, y0, x1, y1)`` with inclusive maxima (as MedSAM
derives them from a mask).

A class absent from a slice: its query still runs (every batch has the same ``[B, N, ...]``
shapes), with a placeholder prompt (the whole-image box, or padding points labelled -1), and
``present[b, n]`` is False. ``SamSegmenter`` then sets that channel's logits to
``ABSENT_CLASS_LOGIT`` (see ``network.py``), so the class is never predicted there and the
loss asks nothing of a prompt that does not exist.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt
from scipy.ndimage import label as connected_pieces

from medsaga_components.config_values import as_bool
from medsaga_components.prompts import PROMPT_KINDS

# The kinds a label can stand in for: those a user gives boxes or points (``PromptKind.user_input``).
PROMPT_FROM_LABEL_KINDS = tuple(name for name, kind in PROMPT_KINDS.items() if kind.user_input)
POINT_KINDS = tuple(name for name, kind in PROMPT_KINDS.items() if kind.user_input == "points")


def _check_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    if labels.ndim != 4 or labels.shape[1] != 1:
        raise ValueError(f"labels must be [B, 1, H, W] class indices, got {tuple(labels.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return labels[:, 0].detach().to("cpu").long()  # [B, H, W]


# Box-per-structure prompts keep a class's largest pieces only: every decoder pass costs as
# much as one box per class, and a label's stray pixels are no structure a user would box.
MAX_STRUCTURES = 4


def structure_masks(mask: np.ndarray, max_structures: int = MAX_STRUCTURES) -> list[np.ndarray]:
    """The connected pieces of ``mask`` (``[H, W]``: 8-connected; ``[X, Y, Z]``: 26-connected), the
    left and right amygdala of a class that merges both, largest first, at most ``max_structures``."""
    pieces, count = connected_pieces(mask, structure=np.ones((3,) * mask.ndim))
    sizes = np.bincount(pieces.ravel(), minlength=count + 1)[1:]
    order = np.argsort(-sizes, kind="stable")[:max_structures]
    return [pieces == index + 1 for index in order]


def boxes_from_labels(labels: torch.Tensor, num_classes: int, jitter: float = 0.0,
                      generator: torch.Generator | None = None,
                      per_structure: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The bounding box of each class in each image, or of each structure of each class.

    Args:
        labels: ``[B, 1, H, W]`` class indices 0..N (0 background).
        num_classes: N.
        jitter: each edge moves by a uniform random amount of up to ``jitter`` times the box's
            side along that axis (MedSAM-style training noise), clamped to the image; 0 for none.
        generator: the random source for the jitter (None: the global one).
        per_structure: one box per connected piece of a class (``structure_masks``) instead
            of one around all of it: a class merging left and right gets a box per side.
    Returns:
        ``boxes`` float ``[B, N, 4]`` (x0, y0, x1, y1), ``present`` bool ``[B, N]``; an absent
        class gets the whole-image box ``(0, 0, W - 1, H - 1)``. With ``per_structure``:
        ``[B, N, K, 4]`` and ``[B, N, K]``, K the most pieces of any class in the batch (at
        least 1), the pieces largest first, the missing ones absent whole-image boxes.
    """
    if per_structure:
        return _structure_boxes(labels, num_classes, jitter, generator)
    classes = _check_labels(labels, num_classes)
    b, h, w = classes.shape
    boxes = torch.tensor([0.0, 0.0, w - 1.0, h - 1.0]).repeat(b, num_classes, 1)
    present = torch.zeros(b, num_classes, dtype=torch.bool)
    for i in range(b):
        for c in range(num_classes):
            rows, cols = torch.nonzero(classes[i] == c + 1, as_tuple=True)
            if rows.numel() == 0:
                continue
            present[i, c] = True
            box = torch.stack([cols.min(), rows.min(), cols.max(), rows.max()]).float()
            if jitter > 0:
                side = torch.stack([box[2] - box[0], box[3] - box[1]]).repeat(2) + 1.0  # w, h, w, h
                box = box + (torch.rand(4, generator=generator) * 2 - 1) * jitter * side
            boxes[i, c] = box
    limits = torch.tensor([w - 1.0, h - 1.0, w - 1.0, h - 1.0])
    boxes = torch.minimum(boxes.clamp(min=0.0), limits)
    # jitter may cross the edges over: keep x0 <= x1 and y0 <= y1
    low, high = torch.minimum(boxes[..., :2], boxes[..., 2:]), torch.maximum(boxes[..., :2], boxes[..., 2:])
    return torch.cat([low, high], dim=-1), present


def stack_class_boxes(per_class: Mapping[int, Sequence[Sequence[float]]], num_classes: int,
                      fill: Sequence[float] = (0.0, 0.0, 0.0, 0.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """A user's boxes, ``{class index 0..N-1: [(x0, y0, x1, y1), ...]}``, as the segmenter's
    prompts of one image: ``[N, 4]`` boxes and ``[N]`` present when no class has more than one,
    else ``[N, K, 4]`` and ``[N, K]``, K the most boxes of any class. The missing boxes are
    ``fill`` and not present."""
    k = max((len(v) for v in per_class.values()), default=1)
    boxes = torch.tensor([float(v) for v in fill]).repeat(num_classes, k, 1)
    present = torch.zeros(num_classes, k, dtype=torch.bool)
    for index, class_boxes in per_class.items():
        if len(class_boxes):
            boxes[index, :len(class_boxes)] = torch.as_tensor(class_boxes, dtype=torch.float32).reshape(-1, 4)
            present[index, :len(class_boxes)] = True
    return (boxes[:, 0], present[:, 0]) if k == 1 else (boxes, present)


def _structure_boxes(labels: torch.Tensor, num_classes: int, jitter: float,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``boxes_from_labels(per_structure=True)``: each structure's box as the class box of a
    label map holding that structure alone (same jitter, same clamping)."""
    classes = _check_labels(labels, num_classes)
    b, h, w = classes.shape
    pieces = [[structure_masks((classes[i] == c + 1).numpy()) for c in range(num_classes)] for i in range(b)]
    k = max(1, max(len(p) for per_image in pieces for p in per_image))
    boxes = torch.tensor([0.0, 0.0, w - 1.0, h - 1.0]).repeat(b, num_classes, k, 1)
    present = torch.zeros(b, num_classes, k, dtype=torch.bool)
    for i in range(b):
        for c in range(num_classes):
            for s, piece in enumerate(pieces[i][c]):
                alone = torch.from_numpy(piece).long()[None, None] * (c + 1)  # [1, 1, H, W]: this structure only
                box, _ = boxes_from_labels(alone, num_classes, jitter, generator)
                boxes[i, c, s], present[i, c, s] = box[0, c], True
    return boxes, present


def deepest_points(mask: np.ndarray, count: int) -> list[tuple[int, int]]:
    """``count`` (row, col) pixels inside ``mask``: first the one farthest from the mask's
    border (the middle of the structure, where a user clicks), then each next one farthest
    from those chosen, weighted by its own depth (spread over the structure, away from edges)."""
    depth = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    rows, cols = np.nonzero(mask)
    weight = depth[rows, cols]
    chosen: list[tuple[int, int]] = []
    spread = np.full(rows.shape, np.inf)
    for _ in range(count):
        pick = int(np.argmax(weight * np.minimum(spread, 1e6)))
        chosen.append((int(rows[pick]), int(cols[pick])))
        spread = np.minimum(spread, np.hypot(rows - rows[pick], cols - cols[pick]))
    return chosen


def points_from_labels(labels: torch.Tensor, num_classes: int, points_per_class: int = 1,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Points inside each class of each image.

    Args:
        labels: ``[B, 1, H, W]`` class indices 0..N (0 background).
        num_classes: N.
        points_per_class: P.
        generator: None for deterministic points (the middle of the structure first, see
            ``deepest_points``: validation, test, prompts from a coarse prediction); a
            generator for points drawn uniformly among the class's pixels (training).
    Returns:
        ``points`` float ``[B, N, P, 2]`` (x, y), ``point_labels`` long ``[B, N, P]``: 1 inside,
        -1 padding (every point of a class absent from the image; its points are 0, 0).
    """
    if points_per_class < 1:
        raise ValueError(f"points_per_class must be >= 1, got {points_per_class}")
    classes = _check_labels(labels, num_classes)
    b = classes.shape[0]
    points = torch.zeros(b, num_classes, points_per_class, 2)
    point_labels = torch.full((b, num_classes, points_per_class), -1, dtype=torch.long)
    for i in range(b):
        for c in range(num_classes):
            mask = classes[i] == c + 1
            if not bool(mask.any()):
                continue
            if generator is None:
                picked = torch.tensor(deepest_points(mask.numpy(), points_per_class), dtype=torch.float32)
            else:
                inside = torch.nonzero(mask).float()  # [M, 2] (row, col)
                picked = inside[torch.randint(len(inside), (points_per_class,), generator=generator)]
            points[i, c] = picked.flip(-1)  # (row, col) -> (x, y)
            point_labels[i, c] = 1
    return points, point_labels


def prompts_from_labels(labels: torch.Tensor, num_classes: int, kind: str = "points", jitter: float = 0.0,
                        points_per_class: int = 1, generator: torch.Generator | None = None,
                        per_structure: bool = False) -> dict[str, torch.Tensor]:
    """The ``prompts`` dict ``SamSegmenter`` takes for ``kind``: ``{"points", "point_labels",
    "present"}`` or ``{"boxes", "present"}`` (``per_structure``: see ``boxes_from_labels``),
    on the labels' device."""
    if kind in POINT_KINDS:
        points, point_labels = points_from_labels(labels, num_classes, points_per_class, generator)
        prompts = {"points": points, "point_labels": point_labels, "present": (point_labels == 1).any(dim=-1)}
    elif kind in PROMPT_FROM_LABEL_KINDS:
        boxes, present = boxes_from_labels(labels, num_classes, jitter, generator, per_structure)
        prompts = {"boxes": boxes, "present": present}
    else:
        raise ValueError(f"prompt kind must be one of {PROMPT_FROM_LABEL_KINDS}, got {kind!r}")
    return {k: v.to(labels.device) for k, v in prompts.items()}


class PromptsFromLabels:
    """A MONAI ``prepare_batch`` for prompted methods: ``batch -> (image, label, (), {"prompts": ...})``,
    so that ``SupervisedTrainer``/``SupervisedEvaluator`` call ``network(image, prompts=...)``.

    Args:
        kind: ``"points"`` or ``"boxes"``.
        num_classes: N, foreground classes.
        jitter: box jitter (fraction of the box side), only when ``seed`` is given.
        points_per_class: P.
        seed: None for the deterministic ground-truth prompts (validation, test: the stand-in
            for a user's clicks or boxes); an int for random prompts from a generator seeded
            once with it (training: new points, new jitter at every step, reproducibly).
        promptless_prob: points only, with ``seed``: the share of queries sent without any
            click (labels -1; the class stays present), for prompts that also name the class
            (``ClassPointPrompt``) and must segment without clicks too.
        per_structure: boxes only: one box per structure of a class (``boxes_from_labels``).
    """

    def __init__(self, kind: str, num_classes: int, jitter: float = 0.0, points_per_class: int = 1,
                 seed: int | None = None, promptless_prob: float = 0.0, per_structure: bool = False) -> None:
        if kind not in PROMPT_FROM_LABEL_KINDS:
            raise ValueError(f"prompt kind must be one of {PROMPT_FROM_LABEL_KINDS}, got {kind!r}")
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        self.kind = kind
        self.num_classes = int(num_classes)
        self.jitter = float(jitter)
        self.points_per_class = int(points_per_class)
        self.seed = seed
        if not 0.0 <= float(promptless_prob) <= 1.0 or (promptless_prob and kind not in POINT_KINDS):
            raise ValueError(f"promptless_prob must be in [0, 1], for point prompts only; got {promptless_prob!r} "
                             f"for {kind!r}")
        self.promptless_prob = float(promptless_prob)
        self.per_structure = as_bool(per_structure, "per_structure")
        self.generator = None if seed is None else torch.Generator().manual_seed(int(seed))

    def prompts(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The prompts for ``[B, 1, H, W]`` labels, on the labels' device."""
        prompts = prompts_from_labels(labels, self.num_classes, self.kind, self.jitter if self.generator else 0.0,
                                      self.points_per_class, self.generator, self.per_structure)
        if self.promptless_prob and self.generator is not None:
            silent = torch.rand(prompts["point_labels"].shape[:2], generator=self.generator) < self.promptless_prob
            prompts["point_labels"] = prompts["point_labels"].masked_fill(silent[..., None].to(labels.device), -1)
        return prompts

    def __call__(self, batchdata: Mapping[str, Any], device: str | torch.device | None = None,
                 non_blocking: bool = False, **kwargs: Any):
        if "label" not in batchdata:
            raise ValueError("PromptsFromLabels needs a 'label' in the batch to derive the prompts from")
        image = batchdata["image"].to(device=device, non_blocking=non_blocking, **kwargs)
        label = batchdata["label"].to(device=device, non_blocking=non_blocking, **kwargs)
        prompts = {k: v.to(device=device, non_blocking=non_blocking) for k, v in self.prompts(batchdata["label"]).items()}
        return image, label, (), {"prompts": prompts}

    def __repr__(self) -> str:
        return (f"PromptsFromLabels(kind={self.kind!r}, num_classes={self.num_classes}, jitter={self.jitter}, "
                f"points_per_class={self.points_per_class}, seed={self.seed})")

