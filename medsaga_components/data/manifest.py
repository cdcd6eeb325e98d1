"""The few-shot manifest: which slices train, which slices validate and test.

Written once by ``medsaga fewshot`` and read by training and evaluation, so that both use
the same slices and the held-out slices provably never meet the few-shot ones. Layout::

    {"format": "medsaga-fewshot-manifest", "version": 1,
     "dataset_json": "/abs/path/dataset.json", "split": "training", "axis": 2,
     "strategy": "total", "spacing": "random", "seed": 0, "shots": 5, "k": 5, "holdout": "declared",
     "class_names": ["background", "grey matter", "white matter"],
     "available_labelled_slices": 40,
     "slices":     [{"volume": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz", "axis": 2, "slice_index": 71}],
     "validation": [{"volume": ..., "label": ..., "axis": 2, "slice_start": 0, "slice_stop": 12}],
     "test":       [...]}

``volume`` and ``label`` are the paths exactly as written in dataset.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medsaga_components.io.atomic import write_json_atomic

MANIFEST_FORMAT = "medsaga-fewshot-manifest"
MANIFEST_VERSION = 1


class ManifestError(ValueError):
    """A manifest file is missing or malformed."""


@dataclass(frozen=True)
class SliceRef:
    """One 2-D slice: ``volume`` and ``label`` as written in dataset.json."""

    volume: str
    label: str | None
    axis: int
    slice_index: int


@dataclass(frozen=True)
class SliceRange:
    """Slices ``slice_start <= i < slice_stop`` of one volume along ``axis``."""

    volume: str
    label: str | None
    axis: int
    slice_start: int
    slice_stop: int

    def refs(self) -> list[SliceRef]:
        return [SliceRef(self.volume, self.label, self.axis, i) for i in range(self.slice_start, self.slice_stop)]

    def contains(self, ref: SliceRef) -> bool:
        return ref.volume == self.volume and ref.axis == self.axis and self.slice_start <= ref.slice_index < self.slice_stop


@dataclass(frozen=True)
class Manifest:
    dataset_json: str
    split: str
    axis: int
    strategy: str
    seed: int
    shots: float  # as requested: a count, or a fraction for strategy "fraction"
    k: int  # slices actually selected
    holdout: str  # how validation/test were separated: "declared", "volume" or "slices"
    class_names: tuple[str, ...]
    available_labelled_slices: int
    slices: tuple[SliceRef, ...]
    validation: tuple[SliceRange, ...] = field(default_factory=tuple)
    test: tuple[SliceRange, ...] = field(default_factory=tuple)
    spacing: str = "random"  # "random" (seeded, stratified) or "even"; manifests before it had only "random"
    synthesis: dict | None = None  # exemplar-guided synthesis settings (data/synthesis.py), when a bundle uses it

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "dataset_json": self.dataset_json,
            "split": self.split,
            "axis": self.axis,
            "strategy": self.strategy,
            "spacing": self.spacing,
            "seed": self.seed,
            "shots": self.shots,
            "k": self.k,
            "holdout": self.holdout,
            "class_names": list(self.class_names),
            "available_labelled_slices": self.available_labelled_slices,
            "slices": [asdict(ref) for ref in self.slices],
            "validation": [asdict(r) for r in self.validation],
            "test": [asdict(r) for r in self.test],
            **({} if self.synthesis is None else {"synthesis": dict(self.synthesis)}),
        }


def write_manifest(path: str | Path, manifest: Manifest) -> str:
    """Write ``manifest`` as JSON (atomically); returns the path written."""
    write_json_atomic(path, manifest.to_json())
    return str(path)


def _require(raw: dict, key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    if key not in raw:
        raise ManifestError(f"{path}: missing key {key!r}")
    if not isinstance(raw[key], kind) or isinstance(raw[key], bool):
        raise ManifestError(f"{path}: key {key!r} has {raw[key]!r}, expected {getattr(kind, '__name__', kind)}")
    return raw[key]


def _items(raw: dict, key: str, cls: type, path: Path) -> tuple:
    items = raw.get(key, [])
    if not isinstance(items, list):
        raise ManifestError(f"{path}: key {key!r} must be a list")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(cls(**item))
        except TypeError as exc:
            raise ManifestError(f"{path}: {key}[{i}] = {item!r} does not match {cls.__name__}: {exc}") from exc
    return tuple(out)


def read_manifest(path: str | Path) -> Manifest:
    """Read a manifest; a relative ``dataset_json`` is resolved against the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"few-shot manifest not found: {path} (create it with `medsaga fewshot`)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path}: not a medsaga few-shot manifest (expected \"format\": \"{MANIFEST_FORMAT}\")")
    if raw.get("version") != MANIFEST_VERSION:
        raise ManifestError(f"{path}: manifest version {raw.get('version')!r}, expected {MANIFEST_VERSION}")
    dataset_json = Path(_require(raw, "dataset_json", str, path))
    if not dataset_json.is_absolute():
        dataset_json = (path.parent / dataset_json).resolve()
    slices = _items(raw, "slices", SliceRef, path)
    if not slices:
        raise ManifestError(f"{path}: 'slices' is empty, expected at least one few-shot slice")
    return Manifest(
        dataset_json=str(dataset_json),
        split=_require(raw, "split", str, path),
        axis=_require(raw, "axis", int, path),
        strategy=_require(raw, "strategy", str, path),
        seed=_require(raw, "seed", int, path),
        shots=_require(raw, "shots", (int, float), path),
        k=_require(raw, "k", int, path),
        holdout=_require(raw, "holdout", str, path),
        class_names=tuple(_require(raw, "class_names", list, path)),
        available_labelled_slices=_require(raw, "available_labelled_slices", int, path),
        slices=slices,
        validation=_items(raw, "validation", SliceRange, path),
        test=_items(raw, "test", SliceRange, path),
        spacing=_require(raw, "spacing", str, path) if "spacing" in raw else "random",
        synthesis=_require(raw, "synthesis", dict, path) if "synthesis" in raw else None,
    )
