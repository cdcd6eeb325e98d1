"""Which volumes an inference run segments, and how their intensities are scaled."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom

from medsaga_components.data.decathlon import parse_modality

VOLUME_SUFFIXES = (".nii.gz", ".nii")


def list_volumes(dataset_dir: str | Path) -> list[dict[str, str]]:
    """``[{"image": path}]`` for every volume to segment in ``dataset_dir``.

    A folder with a Decathlon ``dataset.json`` gives its ``test`` images (paths relative to
    the file: NIfTI files or DICOM series folders); any other folder gives its NIfTI files and
    its subfolders of DICOM files (one series each), sorted. An empty result is an error that
    names the folder, not an inference run that silently writes nothing.
    """
    folder = Path(dataset_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset_dir {folder} is not a folder of NIfTI volumes or DICOM series")
    description = folder / "dataset.json"
    if description.is_file():
        entries = json.loads(description.read_text()).get("test", [])
        images = [folder / (e["image"] if isinstance(e, dict) else e) for e in entries]
    else:
        images = sorted(p for p in folder.iterdir() if p.name.endswith(VOLUME_SUFFIXES) or _holds_dicom(p))
    missing = [str(p) for p in images if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{description}: test images not found: {missing}")
    if not images:
        raise FileNotFoundError(f"no volumes to segment in {folder}: expected *.nii.gz files, folders of DICOM "
                                "series, or a dataset.json with a 'test' list")
    return [{"image": str(p)} for p in images]


def _holds_dicom(path: Path) -> bool:
    """A subfolder whose first file is DICOM (``dicom_series.check_series`` checks the rest)."""
    if not path.is_dir():
        return False
    first = next((p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")), None)
    return first is not None and pydicom.misc.is_dicom(str(first))


def dataset_modality(dataset_dir: str | Path, default: str = "MRI") -> str:
    """The modality whose intensity scaling inference applies (``data.intensity``): the one
    the folder's ``dataset.json`` declares, as training read it, else ``default``."""
    description = Path(dataset_dir) / "dataset.json"
    if not description.is_file():
        return default
    raw = json.loads(description.read_text())
    return parse_modality(raw["modality"], description) if "modality" in raw else default
