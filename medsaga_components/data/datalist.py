"""MONAI datalists (``[{"image": path, "label": path}, ...]``) as a Decathlon ``dataset.json``.

MONAI Label's ``BundleTrainTask`` hands a bundle the labelled volumes as the overrides
``train#dataset#data`` and ``validate#dataset#data``. The few-shot experiment reads datasets as
Decathlon folders (validation, few-shot selection and manifest all start there), so the lists
are written as one: the classes and modality come from the bundle's own ``dataset.json`` (the
classes its metadata's ``channel_def`` names), the images from the lists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from medsaga_components.io.atomic import write_json_atomic
from medsaga_components.data.decathlon import DatasetError

# dataset.json keys that describe the classes and intensities rather than the images
DECLARATION_KEYS = ("labels", "modality", "nonfinite_fill")


def check_datalist(data: Any, key: str, allow_empty: bool = False) -> list[dict[str, str]]:
    """``data`` as a list of ``{"image", "label"}`` path pairs (absolute); errors name ``key``."""
    if not isinstance(data, (list, tuple)):
        raise DatasetError(f"{key} must be a list of {{\"image\": path, \"label\": path}} objects, "
                           f"got {type(data).__name__}")
    if not data and not allow_empty:
        raise DatasetError(f"{key} is empty; expected at least one labelled image")
    pairs = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), (str, Path)) for k in ("image", "label")):
            raise DatasetError(f"{key}[{i}] must be an object with 'image' and 'label' path strings, got {item!r}")
        pairs.append({k: str(Path(item[k]).resolve()) for k in ("image", "label")})
    return pairs


def write_datalist_dataset(train_data: Sequence[dict], validation_data: Sequence[dict] | None,
                           declared_by: str | Path, out: str | Path) -> str:
    """Write ``out/dataset.json`` with ``train_data`` as ``training`` and ``validation_data``
    (when non-empty) as ``validation``; no test split. ``declared_by``: the dataset.json whose
    labels and modality apply. Relative paths are taken from the working directory, as MONAI's
    datalists are. Returns the written path."""
    training = check_datalist(train_data, "train#dataset#data")
    validation = check_datalist(validation_data or [], "validate#dataset#data", allow_empty=True)
    declared = json.loads(Path(declared_by).read_text(encoding="utf-8"))
    payload = {"name": "datalist given as train#dataset#data",
               **{k: declared[k] for k in DECLARATION_KEYS if k in declared},
               "training": training, "validation": validation, "test": []}
    return str(write_json_atomic(Path(out) / "dataset.json", payload))
