"""Segmenting a whole volume slice by slice, by propagating box prompts from what a user gives.

A user gives, per structure, labelled slices (seeds) or a 3-D box. From a seed slice, the next
slice is segmented from a box prompt derived from the seed's mask, the slice after from that
prediction's box, and so on (the mechanism of LiteMedSAM's 3-D inference and micro-sam's
``segment_mask_in_volume``). Between two seeds both ends propagate towards the middle; beyond
the outermost seeds propagation goes outwards until a :class:`StopRule` says the structure ended.

With ``resegment``, ``predict`` only guides (another model propagates) and every slice it reached
is then segmented once more by ``resegment`` from the box of the guide's mask there
(:func:`resegment_structure`).

No network is touched here: the caller passes ``predict(k, box) -> bool [H, W]``, which segments
one structure on slice ``k`` from a box prompt. The caller caches image embeddings, so calling it
many times per slice is cheap.

Conventions: a volume is ``[D, H, W]``, slices ``k = 0..D-1`` along the slicing axis, each
``[H, W]``. A 2-D box is ``(x0, y0, x1, y1)`` floats in slice pixels, ``x`` = column, ``y`` = row,
maxima inclusive (SAM/MedSAM); pixel (row ``r``, column ``c``) lies in the box when
``x0 <= c <= x1`` and ``y0 <= r <= y1``. A 3-D box is a 2-D box with an inclusive slice range
``k0..k1``.

Typical use with a user's labelled slices of one class (slices labelled empty stop propagation)::

    volume = propagate_labelled(predict, depth, (H, W), {12: mask12, 20: mask20, 25: empty25})
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Mapping

import numpy as np
from scipy import ndimage

Box = tuple[float, float, float, float]
Predict = Callable[[int, Box], np.ndarray]  # (slice index, box) -> bool [H, W] mask of one structure

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class StopRule:
    """When propagation beyond the outermost seed stops.

    Checked on each new slice's prediction against the previous slice's mask; propagation stops
    at the first slice that fails, and that slice's prediction is discarded. The default stops
    only where the prediction vanished. Consecutive cross-sections of a round structure shrink
    fast near its poles, so ratios meant to catch a drifting prediction should be modest.
    """

    min_pixels: int = 1  # fewer pixels than this: the prediction vanished
    min_area_ratio: float = 0.0  # area(current) < min_area_ratio * area(previous): shrank too much
    min_overlap: float = 0.0  # IoU(current, previous) < min_overlap: drifted off the structure

    def __post_init__(self) -> None:
        if self.min_pixels < 0:
            raise ValueError(f"StopRule.min_pixels is {self.min_pixels}; expected >= 0")
        if self.min_area_ratio < 0:
            raise ValueError(f"StopRule.min_area_ratio is {self.min_area_ratio}; expected >= 0")
        if not 0 <= self.min_overlap <= 1:
            raise ValueError(f"StopRule.min_overlap is {self.min_overlap}; expected 0..1")

    def stops(self, previous: np.ndarray, current: np.ndarray) -> bool:
        """Whether ``current`` (bool ``[H, W]``) ends a structure whose previous slice is ``previous``."""
        area = int(np.count_nonzero(current))
        if area < self.min_pixels:
            return True
        if area < self.min_area_ratio * np.count_nonzero(previous):
            return True
        return self.min_overlap > 0 and iou(previous, current) < self.min_overlap


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks of one shape; 1.0 when both are empty (identical)."""
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def box_of(mask: np.ndarray, margin: float = 0.0, limits: Box | None = None) -> Box | None:
    """Bounding box of the True pixels of a bool ``[H, W]`` mask, or None for an empty mask.

    Each side is widened by ``margin`` times the box's side length along that axis, the length
    counted in pixels (a one-pixel piece has length 1), and by at least one pixel when
    ``margin > 0``, so that even a tiny piece yields a box that can follow a structure growing
    from one slice to the next. The box is then clamped to the slice (``0..W-1``, ``0..H-1``) and,
    when given, to ``limits``; None also when the mask lies wholly outside ``limits``.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"box_of expects a 2-D [H, W] mask; got shape {mask.shape}")
    if margin < 0:
        raise ValueError(f"box margin is {margin}; expected >= 0")
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    x0, x1, y0, y1 = float(cols[0]), float(cols[-1]), float(rows[0]), float(rows[-1])
    if margin > 0:
        dx = max(1.0, margin * (x1 - x0 + 1))
        dy = max(1.0, margin * (y1 - y0 + 1))
        x0, x1, y0, y1 = x0 - dx, x1 + dx, y0 - dy, y1 + dy
    height, width = mask.shape
    lx0, ly0, lx1, ly1 = limits if limits is not None else (0.0, 0.0, width - 1.0, height - 1.0)
    x0, y0 = max(x0, 0.0, float(lx0)), max(y0, 0.0, float(ly0))
    x1, y1 = min(x1, width - 1.0, float(lx1)), min(y1, height - 1.0, float(ly1))
    if x0 > x1 or y0 > y1:
        return None
    return (x0, y0, x1, y1)


def box_mask(box: Box, shape: tuple[int, int]) -> np.ndarray:
    """Bool ``[H, W]``: the pixels inside ``box`` (inclusive maxima)."""
    x0, y0, x1, y1 = box
    rows = np.arange(shape[0])
    cols = np.arange(shape[1])
    return ((rows >= y0) & (rows <= y1))[:, None] & ((cols >= x0) & (cols <= x1))[None, :]


def union_box(a: Box, b: Box) -> Box:
    """The smallest box holding both boxes."""
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


BETWEEN_SEEDS = ("fronts", "interpolate")
# Where a structure ends between its seed and a labelled slice that does not hold it: where the
# stop rule says, or at the slice midway between them, as copying the nearest labelled slice decides.
END_IN_GAP = ("stop_rule", "midway")
# What propagates a request: the model itself, or pretrained LiteMedSAM guiding it (``inference.volume``).
PROPAGATION_GUIDES = ("self", "pretrained")


def propagate_structure(predict: Predict, depth: int, shape: tuple[int, int], seeds: Mapping[int, np.ndarray], *,
                        k_range: tuple[int, int] | None = None, limits: Box | None = None, margin: float = 0.1,
                        stop: StopRule = StopRule(), empty_slices: Collection[int] = (),
                        between: str = "fronts", end_in_gap: str = "stop_rule",
                        resegment: Predict | None = None) -> np.ndarray:
    """Bool ``[D, H, W]`` mask of ONE structure, propagated from its seed slices.

    - ``seeds``: ``{slice index: bool [H, W] mask}``, each non-empty: those slices are copied into
      the result exactly as given (a user's labelled slices are kept as drawn), never predicted.
    - Between consecutive seeds ``a < b``, both ends propagate towards the middle slice
      ``m = (a + b) // 2``: ``a+1..m-1`` each from the slice below, ``b-1..m+1`` each from the slice
      above (so with an even gap the upper front does one slice more), and ``m`` is prompted by
      the union of both fronts' boxes. No stop rule there (the structure is known to continue);
      after an empty prediction a front reuses its last non-empty box.
    - Beyond the outermost seeds, propagation goes outwards, each slice prompted by
      ``box_of(previous mask, margin, limits)``; it stops by ``stop``, at the volume's edge, at
      the end of ``k_range`` (inclusive) or before an empty slice, whichever comes first.
    - ``between="interpolate"``: instead of the two fronts, each slice between two seeds is prompted
      by the box interpolated linearly between the seeds' boxes (grown by ``margin``), so that an
      error on one slice does not carry to the next.
    - ``empty_slices``: slices the user labelled as not holding the structure. They are never
      predicted and stay empty, and propagation never crosses them: a gap between two seeds that
      holds one is filled like two outward propagations (with ``stop``) up to it.
    - ``end_in_gap="midway"``: such an outward propagation, from a seed towards an empty slice,
      also stops at the slice midway between them (on a tie the slice goes to the lower one),
      as copying the nearest labelled slice would end the structure; ``"stop_rule"``: only
      ``stop`` ends it.
    - ``limits`` (the in-plane part of a 3-D box): every prompt box is clamped to it and every
      prediction is zeroed outside it. ``k_range``: no slice outside it is ever predicted.
    - ``resegment``: ``predict`` only guides; every slice it reached but the seeds is then asked
      again of ``resegment`` (:func:`resegment_structure`).

    Raises ValueError naming the slice and what was expected for: no seeds, a seed index outside
    ``0..D-1`` or ``k_range``, a seed of the wrong shape, an empty seed, a seed wholly outside
    ``limits``, a seed also in ``empty_slices``, a ``limits`` box reversed or outside the slice.
    """
    if between not in BETWEEN_SEEDS:
        raise ValueError(f"between is {between!r}; expected one of {BETWEEN_SEEDS}")
    if end_in_gap not in END_IN_GAP:
        raise ValueError(f"end_in_gap is {end_in_gap!r}; expected one of {END_IN_GAP}")
    shape = _check_shape(shape)
    low, high = _check_k_range(k_range, depth)
    if limits is not None:
        limits = _check_box(limits, shape, f"limits box {tuple(limits)}")
    empty = _check_empty_slices(empty_slices, depth)
    seeds = _check_seeds(seeds, shape, depth, (low, high), empty, limits)

    volume = np.zeros((depth, *shape), dtype=bool)
    for k, mask in seeds.items():
        volume[k] = mask
    segment = _checked_predict(predict, shape, limits)
    order = sorted(seeds)

    # Outward propagation ends before the nearest labelled-empty slice on its side.
    below = max((_last_towards(order[0], e, end_in_gap) for e in empty if e < order[0]), default=low)
    above = min((_last_towards(order[-1], e, end_in_gap) for e in empty if e > order[-1]), default=high)
    _propagate_outward(segment, volume, order[0], max(below, low), margin, limits, stop)
    for a, b in zip(order, order[1:]):
        walls = [e for e in empty if a < e < b]
        if walls:
            _propagate_outward(segment, volume, a, _last_towards(a, min(walls), end_in_gap), margin, limits, stop)
            _propagate_outward(segment, volume, b, _last_towards(b, max(walls), end_in_gap), margin, limits, stop)
        elif between == "interpolate":
            _interpolate_gap(segment, volume, a, b, margin, limits)
        else:
            _fill_gap(segment, volume, a, b, margin, limits)
    _propagate_outward(segment, volume, order[-1], min(above, high), margin, limits, stop)
    if resegment is not None:
        return resegment_structure(resegment, volume, margin=margin, limits=limits, keep=seeds.keys())
    return volume


def propagate_from_box(predict: Predict, depth: int, shape: tuple[int, int], box: Box, k0: int, k1: int, *,
                       margin: float = 0.1, stop: StopRule = StopRule(), seed_slice: int | None = None,
                       refine_seed: int = 0, resegment: Predict | None = None) -> np.ndarray:
    """Bool ``[D, H, W]`` mask of the ONE structure inside a user's 3-D box (``box`` on slices ``k0..k1``).

    The seed is ``predict(seed_slice, box)`` on the middle slice (``(k0 + k1) // 2`` unless given),
    zeroed outside ``box``; then :func:`propagate_structure` with ``k_range=(k0, k1)`` and
    ``limits=box``, so no voxel lies outside the 3-D box. When that prediction is empty, the other
    slices of the box are tried outward from it, nearest first (below before above at equal
    distance), and the first non-empty prediction seeds; all empty gives an all-False volume.
    ``refine_seed``: the seed slice is asked again that many times, each time with the box of its
    last prediction (grown by ``margin``), as a user's loose box is tightened around what it holds.
    ``resegment``: ``predict`` only guides, and every slice it reached, the seed too, is asked
    again of ``resegment`` (:func:`resegment_structure`).

    Raises ValueError naming the box and the volume size for a box reversed (``x0 > x1``,
    ``y0 > y1`` or ``k0 > k1``) or not inside the volume, or a ``seed_slice`` outside ``k0..k1``.
    """
    shape = _check_shape(shape)
    where = f"box {tuple(box)} on slices {k0}..{k1} of the volume of {depth}x{shape[0]}x{shape[1]} (D x H x W)"
    if k0 > k1:
        raise ValueError(f"{where} is reversed: expected k0 <= k1")
    if not 0 <= k0 <= k1 <= depth - 1:
        raise ValueError(f"{where} lies outside the volume: expected 0 <= k0 <= k1 <= {depth - 1}")
    box = _check_box(box, shape, where)
    middle = (k0 + k1) // 2 if seed_slice is None else seed_slice
    if not k0 <= middle <= k1:
        raise ValueError(f"seed slice {middle} lies outside the {where}")

    segment = _checked_predict(predict, shape, box)
    for k in _outward_from(middle, k0, k1):
        seed = segment(k, box)
        for _ in range(refine_seed):
            tighter = box_of(seed, margin, box)
            refined = segment(k, tighter) if tighter is not None else seed
            seed = refined if refined.any() else seed
        if seed.any():
            volume = propagate_structure(predict, depth, shape, {k: seed}, k_range=(k0, k1), limits=box,
                                         margin=margin, stop=stop)
            if resegment is not None:
                return resegment_structure(resegment, volume, margin=margin, limits=box)
            return volume
    return np.zeros((depth, *shape), dtype=bool)


def resegment_structure(predict: Predict, guide: np.ndarray, *, margin: float = 0.1, limits: Box | None = None,
                        keep: Collection[int] = ()) -> np.ndarray:
    """Bool ``[D, H, W]``: ONE structure's slices, each asked again from the box of ``guide``'s mask there.

    ``guide`` (bool ``[D, H, W]``) is the structure as another model propagated it: it decides which
    slices hold the structure and where; ``predict`` then segments each of those slices from
    ``box_of(guide[k], margin, limits)``, once, so nothing it predicts feeds the next slice's box.
    That keeps a model that fills whatever box it is given from carrying its boxes past a
    structure's end (a fine-tuned model guided by the pretrained one; ``inference.volume``).
    Slices in ``keep`` (a user's labelled slices) are copied from ``guide``, never asked;
    predictions are zeroed outside ``limits``.
    """
    guide = np.asarray(guide, dtype=bool)
    if guide.ndim != 3:
        raise ValueError(f"resegment_structure expects a bool [D, H, W] guide; got shape {guide.shape}")
    shape = guide.shape[1:]
    if limits is not None:
        limits = _check_box(limits, shape, f"limits box {tuple(limits)}")
    segment = _checked_predict(predict, shape, limits)
    volume = np.zeros_like(guide)
    for k in np.nonzero(guide.any(axis=(1, 2)))[0]:
        k = int(k)
        if k in keep:
            volume[k] = guide[k]
        elif (box := box_of(guide[k], margin, limits)) is not None:  # None: the guide's mask lies outside limits
            volume[k] = segment(k, box)
    return volume


def match_structures(labelled: Mapping[int, np.ndarray]) -> tuple[list[dict[int, np.ndarray]], frozenset[int]]:
    """Split a user's labelled slices of ONE class into structures, each a seed set for :func:`propagate_structure`.

    ``labelled``: ``{slice index: bool [H, W]}``, every slice the user labelled, including slices
    labelled as holding none of the class. Each slice is split into its 8-connected pieces. In
    slice order, the pieces of a labelled slice are matched to the structures that have a piece on
    the previous labelled slice: a pair matches when the masks overlap (IoU > 0) or, failing that,
    when their bounding boxes overlap; mask overlap ranks above any box overlap, then the larger
    IoU (mask or box) wins. Pairs are taken best first, so a piece joins at most one structure and
    a structure takes at most one piece per slice (a structure is a chain of single pieces, which
    keeps every box prompt tight); an unmatched piece starts a new structure. A labelled slice
    with no piece ends every structure reaching it.

    Returns ``(structures, labelled_slices)``: one ``{slice index: mask}`` dict per structure, in
    the order they start, and the set of all labelled slice indices. For a structure, a labelled
    slice that is not one of its seeds is known not to hold it (the user labelled that slice and
    it is not there, or it is some other piece), so pass
    ``empty_slices=labelled_slices - structure.keys()`` to :func:`propagate_structure`; that keeps
    propagation from crossing, or overwriting, any slice the user labelled (see
    :func:`propagate_labelled`).
    """
    slices = sorted(labelled)
    masks = {k: np.asarray(labelled[k], dtype=bool) for k in slices}
    if slices:
        expected = masks[slices[0]].shape
        for k in slices:
            if masks[k].ndim != 2 or masks[k].shape != expected:
                raise ValueError(f"labelled slice {k} has shape {masks[k].shape}; expected a 2-D mask of shape "
                                 f"{expected} (that of slice {slices[0]})")

    structures: list[dict[int, np.ndarray]] = []
    reaching: list[int] = []  # structures with a piece on the previous labelled slice
    previous_k = None
    for k in slices:
        pieces = _pieces(masks[k])
        candidates = [(score, s, p) for s in reaching for p, piece in enumerate(pieces)
                      if (score := _match_score(structures[s][previous_k], piece)) is not None]
        candidates.sort(key=lambda candidate: candidate[0], reverse=True)
        taken_structures: set[int] = set()
        taken_pieces: set[int] = set()
        for _, s, p in candidates:
            if s not in taken_structures and p not in taken_pieces:
                structures[s][k] = pieces[p]
                taken_structures.add(s)
                taken_pieces.add(p)
        reaching = sorted(taken_structures)
        for p, piece in enumerate(pieces):
            if p not in taken_pieces:
                structures.append({k: piece})
                reaching.append(len(structures) - 1)
        previous_k = k
    return structures, frozenset(slices)


def propagate_labelled(predict: Predict, depth: int, shape: tuple[int, int], labelled: Mapping[int, np.ndarray],
                       **options) -> np.ndarray:
    """Bool ``[D, H, W]`` mask of ONE class from a user's labelled slices (``{slice index: bool [H, W]}``).

    :func:`match_structures`, then :func:`propagate_structure` per structure with every labelled
    slice that is not its own as an empty slice; the labelled slices come back exactly as drawn.
    ``options`` go to :func:`propagate_structure` (``k_range``, ``limits``, ``margin``, ``stop``,
    ``resegment``).
    """
    structures, labelled_slices = match_structures(labelled)
    volume = np.zeros((depth, *_check_shape(shape)), dtype=bool)
    for seeds in structures:
        volume |= propagate_structure(predict, depth, shape, seeds,
                                      empty_slices=labelled_slices - seeds.keys(), **options)
    return volume


# --- propagation steps ---------------------------------------------------------------------------------

def _propagate_outward(segment: Predict, volume: np.ndarray, start: int, end: int, margin: float,
                       limits: Box | None, stop: StopRule) -> None:
    """Fill slices from ``start`` (exclusive, already in ``volume``) towards ``end`` (inclusive) until ``stop``."""
    step = 1 if end >= start else -1
    previous = volume[start]
    for k in range(start + step, end + step, step):
        box = box_of(previous, margin, limits)
        if box is None:  # an empty previous mask (a permissive stop rule) leaves nothing to prompt from
            return
        current = segment(k, box)
        if stop.stops(previous, current):
            return
        volume[k] = current
        previous = current


def _fill_gap(segment: Predict, volume: np.ndarray, a: int, b: int, margin: float, limits: Box | None) -> None:
    """Fill slices ``a+1..b-1`` from the seeds on ``a`` and ``b``, both fronts meeting at ``(a + b) // 2``."""
    middle = (a + b) // 2
    lower_box = _front(segment, volume, a, middle, margin, limits)
    upper_box = _front(segment, volume, b, middle, margin, limits)
    if a < middle < b:
        volume[middle] = segment(middle, union_box(lower_box, upper_box))


def _interpolate_gap(segment: Predict, volume: np.ndarray, a: int, b: int, margin: float,
                     limits: Box | None) -> None:
    """Fill slices ``a+1..b-1``, each from the box interpolated between the seeds' boxes on ``a`` and ``b``."""
    first, last = box_of(volume[a]), box_of(volume[b])
    height, width = volume.shape[1:]
    for k in range(a + 1, b):
        t = (k - a) / (b - a)
        x0, y0, x1, y1 = ((1 - t) * u + t * v for u, v in zip(first, last))
        dx, dy = margin * (x1 - x0 + 1), margin * (y1 - y0 + 1)
        box = (max(x0 - dx, 0.0), max(y0 - dy, 0.0), min(x1 + dx, width - 1.0), min(y1 + dy, height - 1.0))
        if limits is not None:
            box = (max(box[0], limits[0]), max(box[1], limits[1]), min(box[2], limits[2]), min(box[3], limits[3]))
        volume[k] = segment(k, box)


def _front(segment: Predict, volume: np.ndarray, start: int, middle: int, margin: float, limits: Box | None) -> Box:
    """Propagate from the seed on ``start`` up to (excluding) ``middle``; returns the front's last non-empty box."""
    step = 1 if middle > start else -1
    box = box_of(volume[start], margin, limits)
    for k in range(start + step, middle, step):
        volume[k] = segment(k, box)
        # Between seeds the structure continues: an empty prediction keeps the last box instead of stopping.
        box = box_of(volume[k], margin, limits) or box
    return box


def _last_towards(seed: int, wall: int, end_in_gap: str) -> int:
    """The last slice a structure seeded on ``seed`` may fill towards ``wall``, a labelled slice
    without it: the one before ``wall``, or with ``"midway"`` the last nearer to ``seed`` (a tie
    goes to the lower slice)."""
    if wall > seed:
        return min(wall - 1, (seed + wall) // 2) if end_in_gap == "midway" else wall - 1
    return max(wall + 1, (seed + wall) // 2 + 1) if end_in_gap == "midway" else wall + 1


def _outward_from(middle: int, low: int, high: int) -> list[int]:
    """Slices ``low..high`` ordered by distance from ``middle``, below before above at equal distance."""
    return sorted(range(low, high + 1), key=lambda k: (abs(k - middle), k))


def _checked_predict(predict: Predict, shape: tuple[int, int], limits: Box | None) -> Predict:
    """``predict`` returning a fresh bool ``[H, W]`` zeroed outside ``limits``, after checking its shape."""
    inside = box_mask(limits, shape) if limits is not None else None

    def segment(k: int, box: Box) -> np.ndarray:
        mask = np.asarray(predict(int(k), tuple(float(v) for v in box)))
        if mask.shape != shape:
            raise ValueError(f"predict returned shape {mask.shape} on slice {k}; expected {shape}")
        mask = mask.astype(bool)  # a copy: zeroing below must not write into the caller's array
        if inside is not None:
            mask &= inside
        return mask

    return segment


# --- matching pieces -------------------------------------------------------------------------------------

def _pieces(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected pieces of a bool ``[H, W]`` mask, in scipy's label order."""
    labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    return [labels == n for n in range(1, count + 1)]


def _match_score(previous: np.ndarray, piece: np.ndarray) -> tuple[int, float] | None:
    """How well ``piece`` continues ``previous``: (2, mask IoU) or (1, box IoU), None when neither overlaps."""
    if np.any(previous & piece):
        return (2, iou(previous, piece))
    overlap = _box_iou(box_of(previous), box_of(piece))
    return (1, overlap) if overlap > 0 else None


def _box_iou(a: Box, b: Box) -> float:
    """IoU of two pixel boxes with inclusive maxima (areas counted in pixels)."""
    def area(box: Box) -> float:
        return max(0.0, box[2] - box[0] + 1) * max(0.0, box[3] - box[1] + 1)

    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    return inter / (area(a) + area(b) - inter)


# --- input checks ------------------------------------------------------------------------------------------

def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    shape = tuple(int(n) for n in shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"slice shape is {shape}; expected (H, W) with H, W >= 1")
    return shape


def _check_k_range(k_range: tuple[int, int] | None, depth: int) -> tuple[int, int]:
    if depth < 1:
        raise ValueError(f"volume depth is {depth}; expected >= 1 slice")
    if k_range is None:
        return 0, depth - 1
    low, high = (int(k) for k in k_range)
    if not 0 <= low <= high <= depth - 1:
        raise ValueError(f"k_range {low}..{high} is reversed or outside the volume's slices 0..{depth - 1}")
    return low, high


def _check_box(box: Box, shape: tuple[int, int], what: str) -> Box:
    """``box`` as floats, after checking it is ordered and inside the ``[H, W]`` slice; ``what`` names it in errors."""
    if len(box) != 4:
        raise ValueError(f"{what} has {len(box)} values; expected (x0, y0, x1, y1)")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x0 > x1 or y0 > y1:
        raise ValueError(f"{what} is reversed: expected x0 <= x1 and y0 <= y1")
    height, width = shape
    if not (0 <= x0 and x1 <= width - 1 and 0 <= y0 and y1 <= height - 1):  # also refuses NaN
        raise ValueError(f"{what} lies outside the {height}x{width} slice: expected 0 <= x <= {width - 1} "
                         f"and 0 <= y <= {height - 1}")
    return (x0, y0, x1, y1)


def _check_empty_slices(empty_slices: Collection[int], depth: int) -> frozenset[int]:
    for k in empty_slices:
        if not 0 <= k <= depth - 1:
            raise ValueError(f"empty slice {k} is outside the volume's slices 0..{depth - 1}")
    return frozenset(int(k) for k in empty_slices)


def _check_seeds(seeds: Mapping[int, np.ndarray], shape: tuple[int, int], depth: int, k_range: tuple[int, int],
                 empty: frozenset[int], limits: Box | None) -> dict[int, np.ndarray]:
    """The seeds as fresh bool ``[H, W]`` arrays keyed by int, after checking each."""
    if not seeds:
        raise ValueError("no seeds: expected at least one {slice index: bool [H, W] mask}")
    checked = {}
    for k, mask in seeds.items():
        if not 0 <= k <= depth - 1:
            raise ValueError(f"seed slice {k} is outside the volume's slices 0..{depth - 1}")
        if not k_range[0] <= k <= k_range[1]:
            raise ValueError(f"seed slice {k} is outside k_range {k_range[0]}..{k_range[1]}")
        if k in empty:
            raise ValueError(f"seed slice {k} is also in empty_slices")
        mask = np.asarray(mask)
        if mask.shape != shape:
            raise ValueError(f"seed on slice {k} has shape {mask.shape}; expected {shape}")
        mask = mask.astype(bool)
        if not mask.any():
            raise ValueError(f"seed on slice {k} is empty; a slice without the structure belongs in empty_slices")
        if limits is not None and not (mask & box_mask(limits, shape)).any():
            raise ValueError(f"seed on slice {k} has no pixel inside the limits box {limits}")
        checked[int(k)] = mask
    return checked
