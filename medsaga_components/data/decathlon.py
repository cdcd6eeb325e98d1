"""Medical Segmentation Decathlon style ``dataset.json``: loading and validation.

The format::

    {"labels": {"0": "background", "1": "grey matter", "2": "white matter"},
     "modality": {"0": "MRI"},                       # or "CT"
     "training":   [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}, ...],
     "validation": [{"image": ..., "label": ...}],   # optional
     "test":       ["imagesTs/b.nii.gz", {"image": ..., "label": ...}],  # optional
     "nonfinite_fill": 0,                            # optional: replaces NaN/inf voxels
     "roi_names": {"GTV-1": "tumour", "BODY": null}} # optional: RTSTRUCT ROI -> label name

Paths are relative to the json file. Images are NIfTI volumes, 2-D PNGs (masks then are
PNGs whose pixel values are the label values) or DICOM series folders, whose labels may be
RTSTRUCT files (``.dcm``): their ROIs take the value of the label of the same name, or of the
one ``roi_names`` maps them to (``null``: left out); see ``rtstruct``.

``load_decathlon`` checks the json itself; ``validate_dataset`` also reads every listed file in
full (a truncated file has a valid header), so that a broken dataset fails before training with
an error naming the file. Images with NaN or infinite voxels are refused unless the json asks
for them to be replaced (``nonfinite_fill``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medsaga_components.data.labels import ClassMap
from medsaga_components.data.volume_io import VolumeReadError, read_image, read_label
from medsaga_components.modalities import MODALITIES, check_modalities, modality_index

SPLITS = ("training", "validation", "test")

# Affines written by different tools for the same grid differ in float32 rounding only.
AFFINE_TOLERANCE_MM = 1e-3


class DatasetError(ValueError):
    """A dataset.json, or a file it lists, is missing, malformed or inconsistent."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = problems or [message]
        super().__init__(message)


@dataclass(frozen=True)
class DatasetEntry:
    """One image (and its label map, if any) as listed in a split of dataset.json."""

    image: str  # exactly as written in dataset.json
    label: str | None
    image_path: Path  # resolved against the json's folder
    label_path: Path | None


@dataclass(frozen=True)
class DecathlonDataset:
    path: Path  # the dataset.json file
    name: str
    modality: str  # e.g. "MRI", "CT"
    labels: dict[int, str]  # declared label value -> name, ascending, 0 first
    splits: dict[str, tuple[DatasetEntry, ...]] = field(default_factory=dict)
    nonfinite_fill: float | None = None  # value replacing NaN/inf image voxels; None refuses them
    roi_names: dict[str, str | None] = field(default_factory=dict)  # RTSTRUCT ROI name -> label name or None

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def class_map(self) -> ClassMap:
        return ClassMap(tuple(self.labels), tuple(self.labels.values()))

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names by class index (index 0 is background)."""
        return tuple(self.labels.values())

    @property
    def roi_labels(self) -> dict[str, int | None]:
        """RTSTRUCT ROI name -> label value: every foreground label's own name, then ``roi_names``."""
        by_name = {name: value for value, name in self.labels.items() if value != 0}
        return {**by_name, **{roi: None if name is None else by_name[name] for roi, name in self.roi_names.items()}}

    def read_label(self, entry: DatasetEntry) -> np.ndarray:
        """The label values [X, Y, Z] of ``entry`` (a label file, or an RTSTRUCT on its series)."""
        return read_label(entry.label_path, entry.image_path, self.roi_labels)[0]

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.labels)

    def entries(self, split: str) -> tuple[DatasetEntry, ...]:
        if split not in SPLITS:
            raise DatasetError(f"{self.path}: unknown split {split!r}, expected one of {list(SPLITS)}")
        return self.splits.get(split, ())

    def resolve(self, relative: str) -> Path:
        """A path as written in dataset.json -> the file on disk."""
        return (self.root / relative).resolve()


def _dataset_json_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"dataset.json not found: {path}")
    return path.resolve()


def _parse_labels(raw: Any, path: Path) -> dict[int, str]:
    example = '{"0": "background", "1": "liver"}'
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{path}: key 'labels' must be a non-empty object such as {example}, got {raw!r}")
    labels: dict[int, str] = {}
    for key, name in raw.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise DatasetError(f"{path}: 'labels' key {key!r} is not an integer label value (expected e.g. {example})")
        if value < 0:
            raise DatasetError(f"{path}: 'labels' key {key!r} is negative, expected label values >= 0")
        if not isinstance(name, str):
            raise DatasetError(f"{path}: 'labels'[{key!r}] must be a class name string, got {name!r}")
        if value in labels:
            raise DatasetError(f"{path}: 'labels' declares value {value} twice")
        labels[value] = name
    if 0 not in labels:
        raise DatasetError(f"{path}: 'labels' must declare \"0\" (background), got keys {list(raw)}")
    if len(labels) < 2:
        raise DatasetError(f"{path}: 'labels' declares only background, expected at least one foreground class")
    return dict(sorted(labels.items()))


def parse_modality(raw: Any, path: Path) -> str:
    """dataset.json's ``modality`` (``"MRI"`` or ``{"0": "MRI"}``) -> the one modality it names."""
    if isinstance(raw, str) and raw.strip():
        return raw.strip()
    if isinstance(raw, dict) and len(raw) == 1:
        (value,) = raw.values()
        if isinstance(value, str) and value.strip():
            return value.strip()
    if isinstance(raw, dict) and len(raw) > 1:
        raise DatasetError(
            f"{path}: 'modality' declares {len(raw)} channels {raw}; expected one channel "
            "(medsaga reads single-channel images: store each channel as its own dataset)"
        )
    raise DatasetError(f"{path}: key 'modality' must be \"CT\", \"MRI\" or {{\"0\": \"MRI\"}}, got {raw!r}")


def _parse_nonfinite_fill(raw: Any, path: Path) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not np.isfinite(raw):
        raise DatasetError(f"{path}: key 'nonfinite_fill' must be a finite number (the intensity that replaces "
                           f"NaN/inf voxels, e.g. 0), got {raw!r}")
    return float(raw)


def _parse_roi_names(raw: Any, labels: dict[int, str], path: Path) -> dict[str, str | None]:
    if raw is None:
        return {}
    names = {name for value, name in labels.items() if value != 0}
    if not isinstance(raw, dict) or not all(isinstance(k, str) and (v is None or v in names) for k, v in raw.items()):
        raise DatasetError(f"{path}: key 'roi_names' must map RTSTRUCT ROI names to label names {sorted(names)} "
                           f"or null (left out), e.g. {{\"GTV-1\": \"{sorted(names)[0]}\"}}; got {raw!r}")
    return dict(raw)


def _parse_entries(raw: Any, split: str, path: Path, label_required: bool) -> tuple[DatasetEntry, ...]:
    if not isinstance(raw, list):
        raise DatasetError(f"{path}: key {split!r} must be a list of {{\"image\", \"label\"}} objects, got {type(raw).__name__}")
    entries = []
    for i, item in enumerate(raw):
        if isinstance(item, str) and not label_required:
            item = {"image": item}
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            raise DatasetError(f"{path}: {split}[{i}] must be an object with an 'image' path string, got {item!r}")
        label = item.get("label")
        if label is None and label_required:
            raise DatasetError(f"{path}: {split}[{i}] ({item['image']}) has no 'label', expected a label path")
        if label is not None and not isinstance(label, str):
            raise DatasetError(f"{path}: {split}[{i}] 'label' must be a path string, got {label!r}")
        entries.append(DatasetEntry(
            image=item["image"],
            label=label,
            image_path=(path.parent / item["image"]).resolve(),
            label_path=(path.parent / label).resolve() if label is not None else None,
        ))
    return tuple(entries)


def load_decathlon(path: str | Path) -> DecathlonDataset:
    """Parse and check a dataset.json (``path`` may be the file or its folder); files are not opened."""
    json_path = _dataset_json_path(path)
    try:
        raw = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{json_path}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise DatasetError(f"{json_path}: expected a JSON object at the top level")
    for key in ("labels", "modality", "training"):
        if key not in raw:
            raise DatasetError(f"{json_path}: missing key {key!r} (a Decathlon dataset.json needs labels, modality, training)")
    splits = {
        "training": _parse_entries(raw["training"], "training", json_path, label_required=True),
        "validation": _parse_entries(raw.get("validation", []), "validation", json_path, label_required=True),
        "test": _parse_entries(raw.get("test", []), "test", json_path, label_required=False),
    }
    if not splits["training"]:
        raise DatasetError(f"{json_path}: 'training' is empty, expected at least one labelled image")
    # An image in two splits would let test slices leak into the few-shot training set.
    seen: dict[Path, str] = {}
    for split, entries in splits.items():
        for entry in entries:
            if entry.image_path in seen and seen[entry.image_path] != split:
                raise DatasetError(f"{json_path}: image {entry.image} is listed in both "
                                   f"{seen[entry.image_path]!r} and {split!r}; splits must not share images")
            seen[entry.image_path] = split
    labels = _parse_labels(raw["labels"], json_path)
    return DecathlonDataset(
        path=json_path,
        name=str(raw.get("name", json_path.parent.name)),
        modality=parse_modality(raw["modality"], json_path),
        labels=labels,
        splits=splits,
        nonfinite_fill=_parse_nonfinite_fill(raw.get("nonfinite_fill"), json_path),
        roi_names=_parse_roi_names(raw.get("roi_names"), labels, json_path),
    )


def _entry_problems(entry: DatasetEntry, dataset: DecathlonDataset) -> list[str]:
    """Everything wrong with one image/label pair, each message naming the file."""
    class_map = dataset.class_map
    try:
        image, image_affine = read_image(entry.image_path, dataset.nonfinite_fill)
    except VolumeReadError as exc:
        return [str(exc)]
    image_shape = image.shape
    del image  # one volume in memory at a time
    if entry.label_path is None:
        return []
    try:
        labels, label_affine = read_label(entry.label_path, entry.image_path, dataset.roi_labels)
    except VolumeReadError as exc:
        return [str(exc)]
    problems = []
    if labels.shape != image_shape:
        problems.append(f"{entry.label_path}: label shape {labels.shape} differs from image "
                        f"{entry.image_path} shape {image_shape}; expected the same grid")
    elif not np.allclose(image_affine, label_affine, atol=AFFINE_TOLERANCE_MM):
        problems.append(f"{entry.label_path}: label affine differs from image {entry.image_path} affine "
                        f"(max difference {np.abs(image_affine - label_affine).max():.4g}); expected the same "
                        f"voxel-to-world mapping.\nimage:\n{image_affine}\nlabel:\n{label_affine}")
    undeclared = class_map.undeclared_values(labels)
    if undeclared:
        problems.append(f"{entry.label_path}: label values {undeclared} are not declared in 'labels' "
                        f"(declared: {list(class_map.label_values)})")
    if not np.any(labels != 0):
        problems.append(f"{entry.label_path}: no labelled voxel (all background); expected at least one "
                        "foreground voxel, remove the entry or fix the label file")
    return problems


def validate_dataset(path: str | Path, splits: tuple[str, ...] = SPLITS) -> DecathlonDataset:
    """Load dataset.json and open every listed file; raise ``DatasetError`` listing all problems.

    Checks per entry: the files exist and their voxels read in full, image intensities are finite
    (or ``nonfinite_fill`` is set), image and label share shape and affine, label values are
    declared in ``labels``, and the label map has a foreground voxel.
    """
    dataset = load_decathlon(path)
    problems = []
    for split in splits:
        for entry in dataset.entries(split):
            problems.extend(f"[{split}] {p}" for p in _entry_problems(entry, dataset))
    if problems:
        shown = "\n  - ".join(problems[:20])
        more = f"\n  (+{len(problems) - 20} more)" if len(problems) > 20 else ""
        raise DatasetError(f"dataset {dataset.path} failed validation ({len(problems)} problems):\n  - {shown}{more}",
                           problems)
    return dataset


def case_modalities(dataset_json: str | Path, modalities: Sequence[str] = MODALITIES) -> dict[str, int]:
    """``{image path as written in dataset.json: modality index}`` for every case of every split.

    A case's own ``modality`` key wins over the dataset's. Every name is checked against
    ``modalities`` here, before anything trains.
    """
    path = Path(dataset_json)
    if path.is_dir():
        path = path / "dataset.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    if "modality" not in raw:
        raise DatasetError(f"{path}: missing key 'modality'")
    default = parse_modality(raw["modality"], path)
    modalities = check_modalities(modalities)
    default_index = modality_index(default, modalities, where=f"{path} 'modality'")
    lookup: dict[str, int] = {}
    for split in SPLITS:
        for i, entry in enumerate(raw.get(split, []) or []):
            if not isinstance(entry, Mapping):
                lookup[str(entry)] = default_index
                continue
            own = entry.get("modality")
            lookup[str(entry.get("image"))] = default_index if own is None else modality_index(
                own, modalities, where=f"{path} {split}[{i}] ({entry.get('image')})")
    return lookup
