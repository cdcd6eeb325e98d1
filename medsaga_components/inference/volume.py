"""Whole volumes from the prompts a user really gives, by propagation (``inference/propagation.py``):

* one 3-D box per structure: the middle slice from the box, then each next slice from the box
  of the previous slice's prediction, clamped to the 3-D box, until the structure ends;
* a few labelled slices: each structure propagated from them, between two of them from both
  ends; the labelled slices come back exactly as drawn;
* a click: the structure under the click on its slice (asked with the whole slice as its box),
  then propagated as from a labelled slice.

A box-prompted network (medsaga and samed in box mode, mcp_medsam, zero-shot LiteMedSAM) does
the 2-D work; with a ``guide`` (:func:`guide_network`) the guide propagates and the network
segments each slice the guide reached. Each slice's image embedding is computed once
(:class:`SliceEmbeddings`) and reused for every class, structure and direction, so a request
costs one encoder pass per slice the prompts reach (per network) plus one decoder pass per
prompted (slice, structure).

Volumes are ``[C, X, Y, Z]`` tensors already preprocessed (the bundle's ``preprocessing``);
prompts are voxel indices ``[i, j, k]`` of that array; slices are taken along ``axis``, and a
slice's box is ``(x0, y0, x1, y1)`` with x the column (the second in-plane axis) and y the row.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from medsaga_components.data.square_resize import fit_to_square, square_logits_to_slice
from medsaga_components.inference.propagation import (
    PROPAGATION_GUIDES,
    Box,
    StopRule,
    propagate_from_box,
    propagate_labelled,
    propagate_structure,
)
from medsaga_components.inference.openvino_encoder import same_encoder_runtime
from medsaga_components.inference.prompted import in_plane_axes, label_value, prompt_tensors
from medsaga_components.inference.two_pass import unwrapped
from medsaga_components.network import SamSegmenter

# Measured on the small-structure demo (scripts/choose_stop_rule.py, docs/prompted_volumes.md): the
# previous slice's box grown by 0.1 of its side on each side scored best for 3-D boxes (0.592; 0 to
# 0.2 gave 0.443 to 0.574); no stop rule tried (shrinking area, falling overlap) did better than
# stopping where the prediction vanishes; a 3-D box's seed slice asked again gave the same.
DEFAULT_MARGIN = 0.1
DEFAULT_STOP = StopRule(min_pixels=1)
DEFAULT_REFINE_SEED = 0
DEFAULT_BETWEEN = "fronts"
# A structure that a labelled slice does not hold ends midway towards it, as copying the nearest
# labelled slice would end it: the 5 labelled slices of the small-structure demo, 0.417 against
# 0.319 with the stop rule alone: a model that fills its box never stops by itself
# (docs/prompted_volumes.md).
DEFAULT_END_IN_GAP = "midway"


class SliceEmbeddings:
    """The slices of one volume as the network sees them, each encoded at most once.

    Args:
        network: a box-prompted ``SamSegmenter`` in eval mode.
        volume: ``[C, X, Y, Z]`` intensities, preprocessed.
        axis: the spatial axis slices are taken along (0, 1 or 2).
        modality: for MCP prompts (None: the network's default).
    """

    def __init__(self, network: nn.Module, volume: torch.Tensor, axis: int, modality: str | None = None) -> None:
        if volume.ndim != 4:
            raise ValueError(f"expected a volume [C, X, Y, Z], got {tuple(volume.shape)}")
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
        self.network = network
        self.module = unwrapped(network)
        if self.module.prompt.user_input != "boxes":
            raise ValueError(f"propagation needs a box-prompted network; {type(self.module.prompt).__name__} takes "
                             f"{self.module.prompt.user_input or 'no prompts'}")
        self.volume = volume.float()
        self.axis = axis
        self.modality = modality
        self.device = next(self.module.parameters()).device
        rows, cols = in_plane_axes(axis)
        self.depth = volume.shape[1 + axis]
        self.shape = (volume.shape[1 + rows], volume.shape[1 + cols])
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, object]] = {}
        self.decoder_calls = 0
        self.encoder_seconds = 0.0  # time in the image encoder, against a request's whole time

    @property
    def encoded(self) -> list[int]:
        """The slices encoded so far (each once)."""
        return sorted(self._cache)

    def _slice(self, k: int):
        if k not in self._cache:
            image = self.volume.select(1 + self.axis, k)  # [C, H, W]
            square, geometry = fit_to_square(image[None], self.module.image_size)
            square = square.to(self.device)
            start = time.perf_counter()
            with torch.no_grad():
                embedding = self.module.backbone.embed_images(square)
            self.encoder_seconds += time.perf_counter() - start
            self._cache[k] = (square, embedding, geometry)
        return self._cache[k]

    @torch.no_grad()
    def box_logits(self, k: int, class_index: int, box: Box) -> torch.Tensor:
        """``[H, W]`` logits of class ``class_index`` (1..N) on slice ``k`` from one box in its pixels."""
        square, embedding, geometry = self._slice(k)
        framed = geometry.to_square(torch.tensor(box, dtype=torch.float32)[None])
        prompts = prompt_tensors({class_index - 1: framed}, "boxes", self.module.num_classes, self.module.image_size)
        prompts = {key: value.to(self.device) for key, value in prompts.items()}
        if self.modality is not None:
            prompts["modality"] = self.modality
        self.decoder_calls += 1
        # SamSegmenter's own forward (a two-pass wrapper would add nothing to a boxed query), one class decoded
        logits = SamSegmenter.forward(self.module, square, prompts, embeddings=embedding,
                                      only_class=class_index - 1)  # [1, N + 1, S, S]
        return square_logits_to_slice(logits[:, class_index:class_index + 1].float().cpu(), geometry)[0, 0]


class ClassPredictor:
    """``predict(k, box) -> bool [H, W]`` for one class, as propagation calls it; keeps the highest
    logit of each slice's predictions (over the class's structures, as ``SamSegmenter`` takes the
    highest over a class's boxes), by which overlapping classes are resolved.

    ``guide``: the slices of a guide network (:func:`guide_network`); propagation then runs with
    the guide's predictor of the class and this one re-asks each slice (:meth:`roles`)."""

    def __init__(self, slices: SliceEmbeddings, class_index: int, guide: SliceEmbeddings | None = None) -> None:
        self.slices = slices
        self.class_index = class_index
        self.logits: dict[int, np.ndarray] = {}
        self.guide = ClassPredictor(guide, class_index) if guide is not None else None

    def roles(self) -> tuple["ClassPredictor", "ClassPredictor | None"]:
        """``(predict, resegment)`` for the ``propagate_*`` functions: this predictor alone, or, with
        a guide, the guide's predictor propagating and this one segmenting each slice it reached."""
        return (self, None) if self.guide is None else (self.guide, self)

    def __call__(self, k: int, box: Box) -> np.ndarray:
        logits = self.slices.box_logits(k, self.class_index, box).numpy()
        self.logits[k] = np.maximum(self.logits[k], logits) if k in self.logits else logits
        return logits > 0


def _class_scores(mask: np.ndarray, predictor: ClassPredictor) -> np.ndarray:
    """float ``[D, H, W]``: the class's logit where ``mask`` holds (+inf on slices it did not predict,
    a user's labelled slices), ``-inf`` elsewhere."""
    scores = np.full(mask.shape, -np.inf, dtype=np.float32)
    for k in np.nonzero(mask.any(axis=(1, 2)))[0]:
        scores[k][mask[k]] = predictor.logits.get(int(k), np.full(mask.shape[1:], np.inf))[mask[k]]
    return scores


def _labels_from_scores(scores: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 ``[D, H, W]``: each voxel the class of highest score among those that claim it, else 0."""
    unclaimed = np.full(scores[0].shape, -np.inf, dtype=np.float32)
    return np.stack([unclaimed, *scores]).argmax(axis=0).astype(np.uint8)  # all -inf: 0, background


def guide_network(guide: str | None, network: nn.Module) -> nn.Module | None:
    """The network that propagates a request for ``network`` (``PROPAGATION_GUIDES``): None for
    ``"self"`` (``network`` propagates its own predictions), or for ``"pretrained"`` zero-shot
    LiteMedSAM asked with boxes, on ``network``'s device, precision and encoder runtime. A
    fine-tuned model tends to fill whatever box it is given, so its own boxes do not shrink where a
    structure ends; the pretrained model then says where the structure is, slice by slice, and
    ``network`` segments it."""
    if guide in (None, "self"):
        return None
    if guide != "pretrained":
        raise ValueError(f"propagation_guide is {guide!r}; expected one of {PROPAGATION_GUIDES}")
    module = unwrapped(network)
    zero_shot = SamSegmenter("lite_medsam", module.num_classes, checkpoint="pretrained", prompt="boxes")
    zero_shot = zero_shot.to(next(module.parameters()).device).eval()
    return same_encoder_runtime(zero_shot, module)


def _guide_slices(guide: nn.Module | None, volume: torch.Tensor, axis: int) -> SliceEmbeddings | None:
    return SliceEmbeddings(guide, volume, axis) if guide is not None else None


def label_map(slices: SliceEmbeddings, class_mask, guide: SliceEmbeddings | None = None) -> np.ndarray:
    """uint8 ``[D, H, W]`` (slices first): every class's bool ``[D, H, W]`` mask from
    ``class_mask(predictor)`` (a :class:`ClassPredictor` of that class, with ``guide``), a voxel
    claimed by several classes going to the one of highest logit."""
    scores = []
    for class_index in range(1, slices.module.num_classes + 1):
        predictor = ClassPredictor(slices, class_index, guide)
        scores.append(_class_scores(class_mask(predictor), predictor))
    return _labels_from_scores(scores)


def check_boxes_3d(boxes: Mapping[int, Sequence[Sequence[float]]], spatial_shape: Sequence[int],
                   class_names: Sequence[str]) -> None:
    """Refuse a 3-D box that is not ``[i0, j0, k0, i1, j1, k1]``, leaves the volume or is reversed,
    naming the structure (class and box number) and what was expected."""
    for class_index, class_boxes in boxes.items():
        if not 1 <= class_index <= len(class_names):
            raise ValueError(f"boxes for class {class_index}; expected 1..{len(class_names)} ({list(class_names)})")
        for n, box in enumerate(class_boxes):
            name = f"box {n + 1} of {class_names[class_index - 1]!r}"
            if len(box) != 6:
                raise ValueError(f"{name} is {list(box)}; expected [i0, j0, k0, i1, j1, k1] voxel indices")
            low, high = box[:3], box[3:]
            for axis, (lo, hi, size) in enumerate(zip(low, high, spatial_shape)):
                if lo > hi:
                    raise ValueError(f"{name} {list(box)} is reversed along axis {axis} ({lo} > {hi}); expected "
                                     f"[i0, j0, k0, i1, j1, k1] with low <= high")
                if not 0 <= lo <= hi <= size - 1:
                    raise ValueError(f"{name} {list(box)} lies outside the volume {tuple(spatial_shape)} along "
                                     f"axis {axis} ({lo}..{hi}; expected 0..{size - 1})")


@torch.no_grad()
def segment_volume_from_boxes(network: nn.Module, volume: torch.Tensor, axis: int,
                              boxes: Mapping[int, Sequence[Sequence[float]]], class_names: Sequence[str] | None = None,
                              modality: str | None = None, margin: float = DEFAULT_MARGIN,
                              stop: StopRule = DEFAULT_STOP, slices: SliceEmbeddings | None = None,
                              refine_seed: int = DEFAULT_REFINE_SEED, guide: nn.Module | None = None) -> np.ndarray:
    """uint8 ``[X, Y, Z]`` label map from one 3-D box per structure.

    ``boxes``: ``{class index 1..N: [[i0, j0, k0, i1, j1, k1], ...]}`` (inclusive voxel corners, one
    box per structure). No voxel outside a structure's box is ever labelled with its class.
    ``slices``: reuse the embeddings of an earlier request on the same volume. ``guide``: a
    box-prompted network that propagates instead (:func:`guide_network`); ``network`` then
    segments each slice from the box of the guide's mask there."""
    slices = slices or SliceEmbeddings(network, volume, axis, modality)
    names = list(class_names) if class_names is not None else [str(c + 1) for c in range(slices.module.num_classes)]
    check_boxes_3d(boxes, volume.shape[1:], names)
    rows, cols = in_plane_axes(axis)

    def class_mask(predictor: ClassPredictor) -> np.ndarray:
        mask = np.zeros((slices.depth, *slices.shape), dtype=bool)
        for box in boxes.get(predictor.class_index, ()):
            box2d = (float(box[cols]), float(box[rows]), float(box[3 + cols]), float(box[3 + rows]))
            predict, resegment = predictor.roles()
            mask |= propagate_from_box(predict, slices.depth, slices.shape, box2d, int(round(box[axis])),
                                       int(round(box[3 + axis])), margin=margin, stop=stop,
                                       refine_seed=refine_seed, resegment=resegment)
        return mask

    return np.moveaxis(label_map(slices, class_mask, _guide_slices(guide, volume, axis)), 0, axis)


@torch.no_grad()
def segment_volume_from_labelled_slices(network: nn.Module, volume: torch.Tensor, axis: int, label: np.ndarray,
                                        labelled: Sequence[int] | None = None, modality: str | None = None,
                                        margin: float = DEFAULT_MARGIN, stop: StopRule = DEFAULT_STOP,
                                        num_classes: int | None = None, slices: SliceEmbeddings | None = None,
                                        between: str = DEFAULT_BETWEEN, guide: nn.Module | None = None,
                                        end_in_gap: str = DEFAULT_END_IN_GAP) -> np.ndarray:
    """uint8 ``[X, Y, Z]`` label map completed from a user's labelled slices.

    ``label``: ``[X, Y, Z]`` class indices 0..N, meaningful on the labelled slices only;
    ``labelled``: their indices along ``axis`` (None: every slice with a labelled voxel). Every
    structure of every class is propagated from them (``propagate_labelled``); a labelled slice
    where a class is absent stops that class's propagation there, and with ``end_in_gap="midway"``
    (the default) midway towards it already. The labelled slices come back
    exactly as given. ``guide``: as for :func:`segment_volume_from_boxes`."""
    slices = slices or SliceEmbeddings(network, volume, axis, modality)
    label = np.asarray(label)
    if label.shape != tuple(volume.shape[1:]):
        raise ValueError(f"the labelled volume is {label.shape}; expected the image's {tuple(volume.shape[1:])}")
    n = slices.module.num_classes if num_classes is None else num_classes
    undeclared = sorted(set(np.unique(label).tolist()) - set(range(n + 1)))
    if undeclared:
        raise ValueError(f"the labelled slices hold values {undeclared}; expected class indices 0..{n}")
    by_slice = np.moveaxis(label, axis, 0)
    if labelled is None:
        labelled = [int(k) for k in np.nonzero(by_slice.any(axis=(1, 2)))[0]]
    if not labelled:
        raise ValueError("no labelled slice: label at least one slice of the structures to segment")
    for k in labelled:
        if not 0 <= k < slices.depth:
            raise ValueError(f"labelled slice {k} is outside the volume (0..{slices.depth - 1} along axis {axis})")

    def class_mask(predictor: ClassPredictor) -> np.ndarray:
        drawn = {int(k): by_slice[k] == predictor.class_index for k in labelled}
        if not any(mask.any() for mask in drawn.values()):
            return np.zeros(by_slice.shape, dtype=bool)
        predict, resegment = predictor.roles()
        return propagate_labelled(predict, slices.depth, slices.shape, drawn, margin=margin, stop=stop,
                                  between=between, end_in_gap=end_in_gap, resegment=resegment)

    labels = label_map(slices, class_mask, _guide_slices(guide, volume, axis))
    labels[list(labelled)] = by_slice[list(labelled)]  # the user's slices as drawn
    return np.moveaxis(labels, 0, axis)


def structure_under_click(mask: np.ndarray, row: int, col: int) -> np.ndarray:
    """The 8-connected piece of bool ``[H, W]`` ``mask`` under the click, else the piece nearest to it
    (a click on a structure's edge that the prediction just misses); all False for an empty mask."""
    pieces, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return np.zeros_like(mask)
    if pieces[row, col]:
        return pieces == pieces[row, col]
    rows, cols = np.nonzero(pieces)
    nearest = np.argmin((rows - row) ** 2 + (cols - col) ** 2)
    return pieces == pieces[rows[nearest], cols[nearest]]


@torch.no_grad()
def segment_volume_from_clicks(network: nn.Module, volume: torch.Tensor, axis: int,
                               clicks: Mapping[int, Sequence[Sequence[float]]], class_names: Sequence[str] | None = None,
                               modality: str | None = None, margin: float = DEFAULT_MARGIN,
                               stop: StopRule = DEFAULT_STOP, slices: SliceEmbeddings | None = None,
                               guide: nn.Module | None = None) -> np.ndarray:
    """uint8 ``[X, Y, Z]`` label map from one click per structure, ``{class index 1..N: [[i, j, k], ...]}``.

    The clicked slice is asked for the class with the whole slice as its box (the first pass of
    box-free inference, which box-mode training teaches); the piece under the click seeds the
    structure, which then propagates both ways as from a labelled slice. ``guide``: as for
    :func:`segment_volume_from_boxes` (the clicked slice is still ``network``'s, which knows the class)."""
    slices = slices or SliceEmbeddings(network, volume, axis, modality)
    names = list(class_names) if class_names is not None else [str(c + 1) for c in range(slices.module.num_classes)]
    rows, cols = in_plane_axes(axis)
    height, width = slices.shape
    for class_index, class_clicks in clicks.items():
        for n, click in enumerate(class_clicks):
            if not 1 <= class_index <= len(names) or len(click) != 3 or any(
                    not 0 <= v <= size - 1 for v, size in zip(click, volume.shape[1:])):
                raise ValueError(f"click {n + 1} of class {class_index} is {list(click)}; expected [i, j, k] inside "
                                 f"the volume {tuple(volume.shape[1:])} and a class 1..{len(names)} ({names})")

    def class_mask(predictor: ClassPredictor) -> np.ndarray:
        mask = np.zeros((slices.depth, height, width), dtype=bool)
        for click in clicks.get(predictor.class_index, ()):
            k, row, col = (int(round(click[a])) for a in (axis, rows, cols))
            seed = structure_under_click(predictor(k, (0.0, 0.0, width - 1.0, height - 1.0)), row, col)
            if seed.any():
                predict, resegment = predictor.roles()
                mask |= propagate_structure(predict, slices.depth, slices.shape, {k: seed}, margin=margin, stop=stop,
                                            resegment=resegment)
        return mask

    return np.moveaxis(label_map(slices, class_mask, _guide_slices(guide, volume, axis)), 0, axis)


def box_around_structure(mask: np.ndarray, jitter: float = 0.0, rng: np.random.Generator | None = None) -> list[float]:
    """``[i0, j0, k0, i1, j1, k1]`` around a bool ``[X, Y, Z]`` structure, each side moved by up to
    ``jitter`` times the box's extent along that axis (a user's drag), clamped to the volume."""
    where = np.nonzero(mask)
    low = np.array([w.min() for w in where], dtype=float)
    high = np.array([w.max() for w in where], dtype=float)
    if jitter:
        rng = rng or np.random.default_rng(0)
        extent = high - low + 1
        low = low + rng.uniform(-jitter, jitter, 3) * extent
        high = high + rng.uniform(-jitter, jitter, 3) * extent
    last = np.array(mask.shape, dtype=float) - 1
    low, high = np.clip(np.round(low), 0, last), np.clip(np.round(high), 0, last)
    return [*np.minimum(low, high).tolist(), *np.maximum(low, high).tolist()]


__all__ = ["SliceEmbeddings", "ClassPredictor", "label_map", "guide_network", "PROPAGATION_GUIDES", "segment_volume_from_boxes", "segment_volume_from_labelled_slices",
           "segment_volume_from_clicks", "structure_under_click", "parse_request", "segment_volume_from_request",
           "box_around_structure", "check_boxes_3d", "DEFAULT_MARGIN", "DEFAULT_STOP"]


REQUEST_KEYS = ("boxes", "label")  # besides label names (clicks)


def parse_request(request: Mapping, labels: Mapping[str, int]) -> tuple[str, object]:
    """A user's request for one volume, in the MONAI Label app's format, as ``(source, prompts)``:

    * ``{"boxes": {label name: [[i0, j0, k0, i1, j1, k1], ...]}}``: ``("boxes", {class index: boxes})``;
    * ``{label name: [[i, j, k], ...]}``: ``("clicks", {class index: clicks})``;
    * ``{"label": path or [X, Y, Z] array}``: ``("label", the labelled volume)``, whose non-empty
      slices along the axis are the user's labelled slices.

    One source per request; label names (or their values) must be the model's."""
    if not isinstance(request, Mapping):
        raise ValueError(f"a request must be a JSON object ({{'boxes': ...}}, {{'label': ...}} or clicks by label "
                         f"name), got {type(request).__name__}")
    clicks = {k: v for k, v in request.items() if k not in REQUEST_KEYS and v}
    given = [name for name, present in (("boxes", request.get("boxes")), ("label", request.get("label") is not None),
                                        ("clicks", clicks)) if present]
    if len(given) != 1:
        raise ValueError(f"a request gives one prompt source: 'boxes', 'label' or clicks by label name; got "
                         f"{given or 'none'}")
    if given[0] == "boxes":
        if not isinstance(request["boxes"], Mapping):
            raise ValueError(f"'boxes' must be {{label: [[i0, j0, k0, i1, j1, k1], ...]}}, got {request['boxes']!r}")
        return "boxes", {label_value(k, labels): _list_of(v, 6) for k, v in request["boxes"].items()}
    if given[0] == "label":
        return "label", request["label"]
    return "clicks", {label_value(k, labels): _list_of(v, 3) for k, v in clicks.items()}


def _list_of(value, width: int) -> list:
    """One box or click, or a list of them, as a list."""
    value = list(value)
    return [value] if value and not isinstance(value[0], (list, tuple)) and len(value) == width else value


@torch.no_grad()
def segment_volume_from_request(network: nn.Module, volume: torch.Tensor, axis: int, request: Mapping,
                                labels: Mapping[str, int], modality: str | None = None,
                                guide: nn.Module | None = None) -> np.ndarray:
    """uint8 ``[X, Y, Z]`` label map from a user's request (:func:`parse_request`): the one entry
    that ``run inference --prompts``, MONAI Label and the CLI call. ``guide``: the network that
    propagates (:func:`guide_network`; None: ``network`` itself)."""
    source, prompts = parse_request(request, labels)
    names = [name for name, _ in sorted(labels.items(), key=lambda item: item[1])]
    if source == "boxes":
        return segment_volume_from_boxes(network, volume, axis, prompts, names, modality, guide=guide)
    if source == "clicks":
        return segment_volume_from_clicks(network, volume, axis, prompts, names, modality, guide=guide)
    if isinstance(prompts, (str, bytes)) or hasattr(prompts, "__fspath__"):
        from medsaga_components.data.volume_io import read_label

        prompts = read_label(prompts)[0]
    return segment_volume_from_labelled_slices(network, volume, axis, np.asarray(prompts), modality=modality,
                                               num_classes=len(labels), guide=guide)


class VolumePrompts:
    """A MONAI ``prepare_batch`` for ``run inference --prompts PATH``: each volume goes to the
    inferer with its request, looked up by the image's file name in ``PATH`` (a JSON object
    ``{file name: request}``); a volume without an entry is segmented without prompts.

    The file is read and checked when the bundle starts: unreadable JSON, a request that is not
    an object, a file name that matches no volume of ``datalist``, or a ``network`` whose prompt
    kind takes no boxes is an error naming it."""

    def __init__(self, path: str | None, datalist: Sequence[Mapping] | None = None,
                 network: nn.Module | None = None) -> None:
        self.requests: dict[str, Mapping] = {}
        if path is None:
            return
        prompt = getattr(unwrapped(network), "prompt", None) if network is not None else None
        if prompt is not None and prompt.user_input != "boxes":
            raise ValueError(f"--prompts {path}: this bundle's model ({type(prompt).__name__}) takes "
                             f"{prompt.user_input or 'no prompts'}; volume requests need a box-prompted model "
                             "(mcp_medsam, or medsaga/samed trained with configs/boxes.json)")
        try:
            requests = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"prompts file {path} not found") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"prompts file {path} is not valid JSON: {exc}") from exc
        if not isinstance(requests, Mapping) or not all(isinstance(v, Mapping) for v in requests.values()):
            raise ValueError(f"prompts file {path}: expected {{image file name: request object}}")
        self.requests = {Path(name).name: request for name, request in requests.items()}
        if datalist is not None:
            known = {Path(str(item["image"])).name for item in datalist}
            unknown = sorted(set(self.requests) - known)
            if unknown:
                raise ValueError(f"prompts file {path} names {unknown}, which are not among the volumes to segment "
                                 f"({sorted(known)[:5]}{'...' if len(known) > 5 else ''})")

    def request_for(self, image: torch.Tensor) -> Mapping | None:
        meta = getattr(image, "meta", {}) or {}
        name = meta.get("filename_or_obj")
        name = name[0] if isinstance(name, (list, tuple)) else name
        return self.requests.get(Path(str(name)).name) if name is not None else None

    def __call__(self, batchdata: Mapping, device: str | torch.device | None = None, non_blocking: bool = False,
                 **kwargs):
        image = batchdata["image"]
        request = self.request_for(image)
        image = image.to(device=device, non_blocking=non_blocking, **kwargs)
        return image, None, (), ({"prompts": request} if request is not None else {})
