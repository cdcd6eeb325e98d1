"""Separating validation and test slices from the slices that few-shot training may use.

Methods:

- ``declared``: the dataset.json's own ``validation``/``test`` lists (labelled entries) are
  held out; every slice of the source split may be a few-shot slice.
- ``volume``: whole volumes of the source split are held out (needs at least 3 volumes).
- ``slices``: each volume's labelled slices along the axis are cut into consecutive blocks
  (up to four, at least eight labelled slices each), and each block into train | validation |
  test slice ranges (for datasets of one or two volumes). Validation and test thus both span
  the volume's extent and lie as near the few-shot slices as each other, so the best model
  and the plateau are chosen on slices like those the test scores (one train | validation |
  test cut put validation beside the few-shot slices and the test at the far end).
- ``auto``: ``declared`` if the dataset lists labelled validation or test entries, else
  ``volume`` with 3+ volumes, else ``slices``.

Either way validation/test slices and few-shot candidates never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medsaga_components.data.decathlon import DecathlonDataset, DatasetError
from medsaga_components.data.labelled_slices import VolumeSlices
from medsaga_components.data.manifest import SliceRange
from medsaga_components.data.slicing import num_slices
from medsaga_components.data.volume_io import read_geometry

HOLDOUT_METHODS = ("auto", "declared", "volume", "slices")


@dataclass(frozen=True)
class Holdout:
    method: str
    train: tuple[SliceRange, ...]  # where few-shot slices may be taken from
    validation: tuple[SliceRange, ...]
    test: tuple[SliceRange, ...]


def _counts(total: int, validation_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, validation, test) counts out of ``total``, each at least 1."""
    if not (0 < validation_fraction < 1 and 0 < test_fraction < 1 and validation_fraction + test_fraction < 1):
        raise ValueError(f"validation_fraction={validation_fraction} and test_fraction={test_fraction} must be "
                         "in (0, 1) and sum to less than 1")
    n_val = max(1, round(total * validation_fraction))
    n_test = max(1, round(total * test_fraction))
    return total - n_val - n_test, n_val, n_test


def split_volume_indices(n_volumes: int, validation_fraction: float, test_fraction: float,
                         seed: int) -> tuple[list[int], list[int], list[int]]:
    """Shuffle volume indices 0..n-1 with ``seed``; return sorted (train, validation, test) index lists."""
    n_train, n_val, _ = _counts(n_volumes, validation_fraction, test_fraction)
    if n_volumes < 3 or n_train < 1:
        raise ValueError(f"a split by volume needs at least 3 volumes with room for training, got {n_volumes}")
    order = np.random.default_rng(seed).permutation(n_volumes).tolist()
    return sorted(order[:n_train]), sorted(order[n_train:n_train + n_val]), sorted(order[n_train + n_val:])


SLICE_BLOCKS = 4  # at most this many train | validation | test blocks per volume
MIN_BLOCK_SLICES = 8  # labelled slices per block: room for at least one of each part


def split_slice_ranges(labelled_indices: list[int], total_slices: int, validation_fraction: float,
                       test_fraction: float) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]]]:
    """Cut one volume into interleaved [start, stop) ranges: consecutive blocks of its labelled
    slices (``labelled_indices``, ascending), each block cut train | validation | test.

    The cuts fall between labelled slices so that each range gets its share of them;
    unlabelled slices before the first block go to train, those between blocks and after the
    last to the test range before them. Returns (train, validation, test) range lists.
    """
    if len(labelled_indices) < 3:
        raise ValueError(f"a split by slice range needs at least 3 labelled slices, got {len(labelled_indices)}")
    n_blocks = max(1, min(SLICE_BLOCKS, len(labelled_indices) // MIN_BLOCK_SLICES))
    blocks = [list(b) for b in np.array_split(np.asarray(labelled_indices), n_blocks)]
    parts: tuple[list, list, list] = ([], [], [])
    for j, block in enumerate(blocks):
        n_train, n_val, _ = _counts(len(block), validation_fraction, test_fraction)
        if n_train < 1:
            raise ValueError(f"a block of {len(block)} labelled slices leaves none for training")
        start = 0 if j == 0 else int(block[0])
        stop = total_slices if j == len(blocks) - 1 else int(blocks[j + 1][0])
        first_val, first_test = int(block[n_train]), int(block[n_train + n_val])
        for part, cut in zip(parts, ((start, first_val), (first_val, first_test), (first_test, stop))):
            part.append(cut)
    return parts


def _whole_volume_ranges(dataset: DecathlonDataset, split: str, axis: int) -> tuple[SliceRange, ...]:
    ranges = []
    for entry in dataset.entries(split):
        if entry.label is None:
            continue  # an unlabelled test image cannot be scored
        shape, _ = read_geometry(entry.image_path)
        ranges.append(SliceRange(entry.image, entry.label, axis, 0, num_slices(shape, axis)))
    return tuple(ranges)


def _full(volume: VolumeSlices, axis: int) -> SliceRange:
    return SliceRange(volume.entry.image, volume.entry.label, axis, 0, volume.num_slices)


def plan_holdout(
    dataset: DecathlonDataset,
    scanned: list[VolumeSlices],
    source_split: str = "training",
    axis: int = 2,
    method: str = "auto",
    validation_fraction: float = 0.15,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> Holdout:
    """Decide which slices are few-shot candidates and which are held out.

    ``scanned`` is ``scan_split(dataset, source_split, axis)``.
    """
    if method not in HOLDOUT_METHODS:
        raise DatasetError(f"holdout method {method!r} unknown, expected one of {list(HOLDOUT_METHODS)}")
    others = [s for s in ("validation", "test") if s != source_split]
    declared = {s: _whole_volume_ranges(dataset, s, axis) for s in others}
    if method == "auto":
        if any(declared.values()):
            method = "declared"
        else:
            method = "volume" if len(scanned) >= 3 else "slices"
    if method == "declared":
        return Holdout("declared", tuple(_full(v, axis) for v in scanned),
                       declared.get("validation", ()), declared.get("test", ()))
    try:
        if method == "volume":
            train, val, test = split_volume_indices(len(scanned), validation_fraction, test_fraction, seed)
            pick = lambda idx: tuple(_full(scanned[i], axis) for i in idx)  # noqa: E731
            return Holdout("volume", pick(train), pick(val), pick(test))
        parts: tuple[list[SliceRange], list[SliceRange], list[SliceRange]] = ([], [], [])
        for volume in scanned:
            indices = [s.ref.slice_index for s in volume.labelled]
            ranges = split_slice_ranges(indices, volume.num_slices, validation_fraction, test_fraction)
            for part, cuts in zip(parts, ranges):
                part.extend(SliceRange(volume.entry.image, volume.entry.label, axis, start, stop) for start, stop in cuts)
        return Holdout("slices", tuple(parts[0]), tuple(parts[1]), tuple(parts[2]))
    except ValueError as exc:
        raise DatasetError(f"{dataset.path}: cannot hold out validation/test slices by {method}: {exc}") from exc
