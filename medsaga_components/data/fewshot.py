"""Reproducible few-shot selection of labelled 2-D slices, and the ``medsaga fewshot`` command.

Strategies:

- ``total``: ``shots`` slices in all;
- ``per_volume``: ``shots`` slices from every volume;
- ``fraction``: ``shots`` is a fraction of all labelled slices (0.005, 0.01, 0.03...), at least 1.

Spacing (how the k slices are placed among the candidates):

- ``random`` (the papers' protocol): stratified. Classes are visited rarest first and, while
  the budget lasts, a random slice containing each not-yet-covered class is taken, so every
  class appears when k allows; the rest of the budget is filled at random. The same seed
  gives the same slices.
- ``even``: what an annotator labelling "every n-th slice" does. The k slices sit at evenly
  spaced positions over the candidates in volume order and slice order, the first and the
  last candidate included, so the labels span the anatomy (no seed involved). Class coverage
  is not enforced; a class the selection misses is logged as a warning.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from medsaga_components.data.decathlon import DecathlonDataset, load_decathlon, validate_dataset
from medsaga_components.data.holdout import plan_holdout
from medsaga_components.data.labelled_slices import LabelledSlice, VolumeSlices, scan_split
from medsaga_components.data.manifest import Manifest, SliceRange, SliceRef, write_manifest
from medsaga_components.data.slicing import check_axis

STRATEGIES = ("total", "per_volume", "fraction")
SPACINGS = ("random", "even")

logger = logging.getLogger(__name__)


class FewShotError(ValueError):
    """The requested few-shot selection is impossible (bad strategy, too few labelled slices)."""


def _stratified_pick(candidates: list[LabelledSlice], k: int, rng: np.random.Generator) -> list[LabelledSlice]:
    """k of ``candidates``: cover every class first (rarest first), then fill at random."""
    shuffled = [candidates[i] for i in rng.permutation(len(candidates))]
    frequency = Counter(c for cand in candidates for c in cand.classes)
    chosen: list[LabelledSlice] = []
    covered: set[int] = set()
    for cls in sorted(frequency, key=lambda c: (frequency[c], c)):
        if len(chosen) == k:
            break
        if cls in covered:
            continue
        pick = next(cand for cand in shuffled if cls in cand.classes and cand not in chosen)
        chosen.append(pick)
        covered |= pick.classes
    chosen += [cand for cand in shuffled if cand not in chosen][: k - len(chosen)]
    return chosen


def _evenly_spaced_pick(candidates: list[LabelledSlice], k: int) -> list[LabelledSlice]:
    """k of ``candidates`` (in volume and slice order) at evenly spaced positions, both ends included."""
    if k == 1:
        return [candidates[(len(candidates) - 1) // 2]]
    positions = np.rint(np.linspace(0, len(candidates) - 1, k)).astype(int)
    return [candidates[i] for i in positions]


def _pick(candidates: list[LabelledSlice], k: int, spacing: str, rng: np.random.Generator) -> list[LabelledSlice]:
    return _evenly_spaced_pick(candidates, k) if spacing == "even" else _stratified_pick(candidates, k, rng)


def _as_number(shots: float, strategy: str) -> float:
    try:
        if isinstance(shots, bool):
            raise TypeError
        return float(shots)
    except (TypeError, ValueError):
        raise FewShotError(f"shots={shots!r} with strategy {strategy!r}: expected a number") from None


def _shot_count(shots: float, strategy: str) -> int:
    value = _as_number(shots, strategy)
    if value != int(value) or int(value) < 1:
        raise FewShotError(f"shots={shots!r} with strategy {strategy!r}: expected a whole number >= 1 "
                           "(use strategy 'fraction' for a fraction of the labelled slices)")
    return int(value)


def select_few_shot_slices(
    dataset: DecathlonDataset | str | Path,
    shots: float,
    strategy: str = "total",
    seed: int = 0,
    axis: int = 2,
    split: str = "training",
    allowed: Sequence[SliceRange] | None = None,
    scanned: list[VolumeSlices] | None = None,
    spacing: str = "random",
) -> list[SliceRef]:
    """Pick few-shot slices (each containing foreground) from ``split`` of ``dataset``.

    Args:
        dataset: a loaded dataset or the path of its dataset.json.
        shots: slices in total (``total``), per volume (``per_volume``), or a fraction in (0, 1]
            of all labelled slices (``fraction``, at least one slice).
        allowed: if given, only slices inside these ranges are candidates (the hold-out's
            training part), so that validation/test slices are never picked.
        scanned: the result of ``scan_split`` if already computed (saves re-reading labels).
        spacing: ``random`` (stratified, seeded) or ``even`` (evenly spaced; see the module doc).

    Returns:
        SliceRefs sorted by volume (dataset.json order) then slice index.

    Raises:
        FewShotError: unknown strategy or spacing, bad ``shots``, or more slices requested than exist.
    """
    if not isinstance(dataset, DecathlonDataset):
        dataset = load_decathlon(dataset)
    axis = check_axis(axis)
    if strategy not in STRATEGIES:
        raise FewShotError(f"few-shot strategy {strategy!r} unknown, expected one of {list(STRATEGIES)}")
    if spacing not in SPACINGS:
        raise FewShotError(f"few-shot spacing {spacing!r} unknown, expected one of {list(SPACINGS)}")
    scanned = scanned if scanned is not None else scan_split(dataset, split, axis)

    def is_allowed(cand: LabelledSlice) -> bool:
        return allowed is None or any(r.contains(cand.ref) for r in allowed)

    per_volume = [[cand for cand in v.labelled if is_allowed(cand)] for v in scanned]
    available = sum(len(c) for c in per_volume)
    where = (f"split {split!r} of {dataset.path} (axis {axis}"
             + (", after holding out validation/test slices)" if allowed is not None else ")"))
    rng = np.random.default_rng(seed)

    if strategy == "per_volume":
        k = _shot_count(shots, strategy)
        chosen = []
        for volume, candidates in zip(scanned, per_volume):
            if k > len(candidates):
                raise FewShotError(f"requested {k} few-shot slices per volume, but {volume.entry.image} has only "
                                   f"{len(candidates)} labelled slices in {where}")
            chosen += _pick(candidates, k, spacing, rng)
    else:
        if strategy == "fraction":
            if not 0 < _as_number(shots, strategy) <= 1:
                raise FewShotError(f"shots={shots!r} with strategy 'fraction': expected a fraction in (0, 1]")
            k = max(1, round(float(shots) * available))
        else:
            k = _shot_count(shots, strategy)
        if k > available:
            raise FewShotError(f"requested {k} few-shot slices, but only {available} labelled slices "
                               f"are available in {where}")
        chosen = _pick([c for cands in per_volume for c in cands], k, spacing, rng)
    if not chosen:
        raise FewShotError(f"no labelled slices are available in {where}")
    if spacing == "even":
        present = set().union(*(c.classes for cands in per_volume for c in cands))
        missing = present - set().union(*(c.classes for c in chosen))
        if missing:
            logger.warning("evenly spaced few-shot slices miss classes %s of %s; spacing 'random' covers every "
                           "class when k allows", sorted(missing), where)
    chosen.sort(key=lambda c: (c.volume_order, c.ref.slice_index))
    return [c.ref for c in chosen]


def fewshot_command(
    dataset_json: str,
    shots: float,
    strategy: str = "total",
    seed: int = 0,
    out: str = "manifest.json",
    axis: int = 2,
    split: str = "training",
    holdout: str = "auto",
    validation_fraction: float = 0.15,
    test_fraction: float = 0.25,
    spacing: str = "random",
) -> str:
    """Validate the dataset, hold out validation/test slices, pick few-shot slices, write the manifest.

    ``medsaga fewshot --dataset_json data/dataset.json --shots 5 --strategy total --seed 0 --out manifest.json``
    (``--spacing even`` for evenly spaced slices instead of the seeded stratified draw)

    ``holdout``: ``auto`` | ``declared`` | ``volume`` | ``slices`` (see ``holdout.py``).
    Returns the manifest path.
    """
    dataset = validate_dataset(dataset_json)
    axis = check_axis(axis)
    scanned = scan_split(dataset, split, axis)
    plan = plan_holdout(dataset, scanned, split, axis, holdout, validation_fraction, test_fraction, seed)
    refs = select_few_shot_slices(dataset, shots, strategy, seed, axis, split, allowed=plan.train, scanned=scanned,
                                  spacing=spacing)
    available = sum(1 for v in scanned for c in v.labelled if any(r.contains(c.ref) for r in plan.train))
    manifest = Manifest(
        dataset_json=str(dataset.path),
        split=split,
        axis=axis,
        strategy=strategy,
        spacing=spacing,
        seed=int(seed),
        shots=float(shots) if strategy == "fraction" else int(float(shots)),
        k=len(refs),
        holdout=plan.method,
        class_names=dataset.class_names,
        available_labelled_slices=available,
        slices=tuple(refs),
        validation=plan.validation,
        test=plan.test,
    )
    return write_manifest(out, manifest)


def check_disjoint(manifest: Manifest) -> None:
    """Raise if a few-shot slice lies in a validation or test range (guards hand-edited manifests)."""
    for ref in manifest.slices:
        for part, ranges in (("validation", manifest.validation), ("test", manifest.test)):
            if any(r.contains(ref) for r in ranges):
                raise FewShotError(f"few-shot slice {ref.volume} #{ref.slice_index} (axis {ref.axis}) "
                                   f"is also in the {part} set of the manifest")
