"""The embedded demo dataset: the MNI ICBM152 2009a template with grey/white-matter labels.

nilearn's wheel ships the template T1 and its tissue probability maps on one 197x233x189
1-mm grid (uint8, 0-255). From them this module writes a Decathlon dataset:

- label 0 background, 1 grey matter (gm >= 128), 2 white matter (wm >= 128); a voxel
  above threshold in both maps takes the tissue with the larger probability;
- axial slabs (axis 2) cropped into separate NIfTI files, each with the affine shifted so
  that every voxel keeps its world position; slabs of different splits are separated by
  a gap of two slices, so few-shot (training) slices and test slices never meet, not even as
  neighbours.

Only nilearn's data files are read (its package is located, never imported).

A second demo task, ``small_structures`` (four small AAL regions on the Colin27 T1, from
Debian's ``mricron-data`` package), is described in ``demo_small_structures.py``. The task is
chosen by name (``write_demo_dataset(out, task=...)``, ``medsaga demo-data --task ...``). A
bundle's ``dataset_dir`` receives a demo on first use only when it is a default demo location,
named like a task's folder (``DEMO_LOCATIONS``: ``mni152_demo``, ``medsaga_demo``,
``aal_small_structures``); any other folder without a dataset.json is an error, so that a
mistyped ``--dataset_dir`` never trains on the demo.

The cross-patient tasks ``lung_tumour_fold1`` .. ``lung_tumour_fold4`` (four lung-cancer CT
patients with their tumour as RTSTRUCT, leave one patient out; downloaded on first use from
PyPI's pycerr wheel) are described in ``radiomics_phantom.py``; their folders are named like
the task.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

import medsaga_components.data.demo_small_structures as demo_small_structures
import medsaga_components.data.radiomics_phantom as radiomics_phantom
from medsaga_components.io.atomic import give_default_mode
from medsaga_components.data.decathlon import DatasetError, validate_dataset
from medsaga_components.data.slicing import crop_slab

logger = logging.getLogger(__name__)

DEMO_VERSION = 2
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
TEMPLATE_SHAPE = (197, 233, 189)
TISSUE_THRESHOLD = 128  # probability maps are stored as 0..255
LABELS = {"0": "background", "1": "grey matter", "2": "white matter"}
SLAB_AXIS = 2
# [start, stop) along the axial axis, where the brain has plenty of grey and white matter
# (every slice holds thousands of voxels of each). Validation and test slabs lie between and
# just above the few-shot candidates, so that the test measures adaptation to the anatomy the
# labelled slices show. (Version 1 tested on z 38-57, the cerebellum and temporal poles,
# which no training slice shows and whose cerebellar cortex the tissue maps call grey
# matter: there, every method scored its worst white-matter Dice.)
DEMO_SLABS = {
    "training": [(40, 60), (100, 120)],
    "validation": [(62, 68), (92, 98)],
    "test": [(70, 90), (122, 136)],
}
SPLIT_FOLDERS = {"training": "Tr", "validation": "Va", "test": "Ts"}
NIFTI_XFORM_MNI_152 = 4  # NIfTI xform code: coordinates are MNI 152 space

MNI152 = "mni152"
SMALL_STRUCTURES = "small_structures"
LUNG_TUMOUR_FOLDS = {f"lung_tumour_fold{fold}": fold for fold in radiomics_phantom.FOLDS}
DEMO_TASKS = (MNI152, SMALL_STRUCTURES, *LUNG_TUMOUR_FOLDS)
DEMO_VERSIONS = {MNI152: DEMO_VERSION, SMALL_STRUCTURES: demo_small_structures.VERSION,
                 **{task: radiomics_phantom.VERSION for task in LUNG_TUMOUR_FOLDS}}
# Folder names: where ``medsaga demo-data`` writes a task without --out, and (for tasks other
# than the MNI152 default) the dataset_dir name that makes ``ensure_demo_dataset`` prepare it.
DEMO_FOLDERS = {MNI152: "medsaga_demo", SMALL_STRUCTURES: "aal_small_structures",
                **{task: task for task in LUNG_TUMOUR_FOLDS}}
# Folder names a bundle's dataset_dir may have for ``ensure_demo_dataset`` to write a demo into
# it: the bundles' default ``data/mni152_demo`` and the tasks' default folders.
DEMO_LOCATIONS = {"mni152_demo": MNI152, **{folder: task for task, folder in DEMO_FOLDERS.items()}}


def template_dir() -> Path:
    """nilearn's bundled data folder (found without importing nilearn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the demo dataset needs nilearn's data files: pip install --no-deps nilearn==0.14.1")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [name for name in TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing template files {missing}; reinstall nilearn==0.14.1")
    return folder


def tissue_labels(gm: np.ndarray, wm: np.ndarray, threshold: int = TISSUE_THRESHOLD) -> np.ndarray:
    """Probability maps (uint8 0..255, same shape) -> uint8 labels 0/1/2 (background/GM/WM)."""
    gm_mask = gm >= threshold
    wm_mask = wm >= threshold
    labels = np.zeros(gm.shape, dtype=np.uint8)
    labels[gm_mask] = 1
    labels[wm_mask] = 2
    both = gm_mask & wm_mask
    labels[both & (gm > wm)] = 1  # ties go to white matter
    return labels


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=NIFTI_XFORM_MNI_152)
    image.set_qform(affine, code=NIFTI_XFORM_MNI_152)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))


def _load_template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    folder = template_dir()
    t1_image = nib.load(str(folder / TEMPLATE_FILES["t1"]))
    arrays = {key: np.asarray(nib.load(str(folder / name)).dataobj) for key, name in TEMPLATE_FILES.items()}
    for key, array in arrays.items():
        if array.shape != TEMPLATE_SHAPE:
            raise DatasetError(f"{folder / TEMPLATE_FILES[key]}: shape {array.shape}, expected {TEMPLATE_SHAPE}")
    return arrays["t1"], tissue_labels(arrays["gm"], arrays["wm"]), np.asarray(t1_image.affine, dtype=np.float64)


def load_demo_volume(task: str = MNI152) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """A demo task's whole source volume, before it is cut into slabs: (image [X, Y, Z] as stored,
    class labels [X, Y, Z], affine, ``{split: [(start, stop), ...]}`` slabs along axis 2). Volume
    inference from a user's prompts (labelled slices of one slab, tested on another) needs it whole."""
    if _check_task(task) == SMALL_STRUCTURES:
        t1, labels, affine = demo_small_structures.load_colin27_small_structures()
        return t1, labels, affine, demo_small_structures.SLABS
    t1, labels, affine = _load_template()
    return t1, labels, affine, DEMO_SLABS


def _write_slabs(folder: Path, image: np.ndarray, labels: np.ndarray, affine: np.ndarray,
                 slabs: dict[str, list[tuple[int, int]]], prefix: str) -> dict[str, list[dict[str, str]]]:
    """Write each split's axial slabs of ``image`` and ``labels`` ([X, Y, Z], same grid) as NIfTI pairs.

    Returns the dataset.json split lists. Each slab's affine is shifted so that its voxels keep
    their world positions.
    """
    splits: dict[str, list[dict[str, str]]] = {}
    for split, ranges in slabs.items():
        suffix = SPLIT_FOLDERS[split]
        entries = []
        for start, stop in ranges:
            name = f"{prefix}_z{start:03d}-{stop:03d}.nii.gz"
            image_slab, slab_affine = crop_slab(image, affine, SLAB_AXIS, start, stop)
            label_slab, _ = crop_slab(labels, affine, SLAB_AXIS, start, stop)
            _save(np.ascontiguousarray(image_slab), slab_affine, folder / f"images{suffix}" / name)
            _save(np.ascontiguousarray(label_slab), slab_affine, folder / f"labels{suffix}" / name)
            entries.append({"image": f"images{suffix}/{name}", "label": f"labels{suffix}/{name}"})
        splits[split] = entries
    return splits


def _write_into(folder: Path) -> None:
    """Write the MNI152 demo's files and dataset.json into ``folder``."""
    t1, labels, affine = _load_template()
    splits = _write_slabs(folder, t1, labels, affine, DEMO_SLABS, "mni152")
    description = {
        "name": "MNI152-2009a-tissue-demo",
        "description": "Axial slabs of the MNI ICBM152 2009a nonlinear symmetric T1 template with grey/white "
                       "matter labels (tissue probability >= 128/255), for trying medsaga offline.",
        "reference": "Fonov et al., NeuroImage 2011 and 2009 (ICBM 2009a); files from the nilearn 0.14.1 wheel",
        "licence": "ICBM 2009a template: copyright McConnell Brain Imaging Centre, free use with attribution",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": LABELS,
        "numTraining": len(splits["training"]),
        "numTest": len(splits["test"]),
        **splits,
        "medsaga_demo": {"version": DEMO_VERSION, "axis": SLAB_AXIS,
                         "slabs": {split: [list(s) for s in slabs] for split, slabs in DEMO_SLABS.items()},
                         "source": TEMPLATE_FILES},
    }
    (folder / "dataset.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")


def _write_small_structures_into(folder: Path) -> None:
    """Write the small-structure demo's files and dataset.json into ``folder`` (see demo_small_structures)."""
    task = demo_small_structures
    t1, labels, affine = task.load_colin27_small_structures()
    splits = _write_slabs(folder, t1, labels, affine, task.SLABS, task.FILE_PREFIX)
    description = {
        **task.dataset_description(),
        "numTraining": len(splits["training"]),
        "numTest": len(splits["test"]),
        **splits,
        "medsaga_demo": {"task": SMALL_STRUCTURES, "version": task.VERSION, **task.demo_marker(labels)},
    }
    (folder / "dataset.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")


def _lung_tumour_writer(task: str) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        description = {**radiomics_phantom.write_fold(folder, LUNG_TUMOUR_FOLDS[task]),
                       "medsaga_demo": {"task": task, "version": radiomics_phantom.VERSION}}
        (folder / "dataset.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    return write


def _writer(task: str) -> Callable[[Path], None]:
    """The function writing ``task`` into a folder (looked up when called, so tests can replace it)."""
    if _check_task(task) in LUNG_TUMOUR_FOLDS:
        return _lung_tumour_writer(task)
    return {MNI152: _write_into, SMALL_STRUCTURES: _write_small_structures_into}[task]


def _check_task(task: str) -> str:
    if task not in DEMO_TASKS:
        raise ValueError(f"unknown demo task {task!r}; expected one of {list(DEMO_TASKS)}")
    return task


def demo_task_for_folder(dataset_dir: str | Path) -> str | None:
    """The demo task a bundle's ``dataset_dir`` receives on first use, from its folder name
    (``.../data/aal_small_structures`` -> ``small_structures``, ``.../data/mni152_demo`` ->
    ``mni152``); None when it is not a default demo location."""
    return DEMO_LOCATIONS.get(Path(dataset_dir).name)


def is_complete_demo(out: str | Path, task: str = MNI152) -> bool:
    """True if ``out`` holds the current version of demo ``task`` and its files all validate."""
    json_path = Path(out) / "dataset.json"
    if _demo_marker(json_path) != (_check_task(task), DEMO_VERSIONS[task]):
        return False
    try:
        validate_dataset(json_path)
    except (OSError, ValueError):
        return False
    return True


def write_demo_dataset(out: str | None = None, overwrite: bool = False, task: str = MNI152) -> str:
    """Write demo ``task`` into folder ``out``; returns its dataset.json.

    ``medsaga demo-data --out DIR`` (the MNI152 demo) or ``medsaga demo-data --task
    small_structures --out DIR``. Tasks: ``mni152`` (grey/white matter, from nilearn's wheel) and
    ``small_structures`` (amygdala, pallidum, insula, parahippocampal gyrus, from Debian's
    ``mricron-data``: ``apt-get install mricron-data``). Without ``out``, the task's
    ``DEMO_FOLDERS`` name in the current folder.

    Idempotent: an existing complete demo of ``task`` in ``out`` is kept as is. Files are written
    into a temporary folder beside ``out`` that is renamed into place, so an interrupted run
    leaves nothing half-written. A non-empty ``out`` that is not this demo is refused unless
    ``overwrite=True``.
    """
    writer = _writer(task)
    out_dir = Path(DEMO_FOLDERS[task] if out is None else out).resolve()
    if is_complete_demo(out_dir, task) and not overwrite:
        return str(out_dir / "dataset.json")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder; choose another --out for the demo dataset")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty and holds no complete medsaga {task} demo dataset; "
                              "choose an empty or new folder, or pass --overwrite True")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    give_default_mode(staging)  # mkdtemp's 0700 would hide the demo from other users once renamed
    try:
        writer(staging)
        if out_dir.exists():
            # Move the old folder aside first so that the rename below is a single step.
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "previous")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(staging, out_dir)
        except OSError:
            # Another process finished first: use its demo if it is complete.
            if not is_complete_demo(out_dir, task):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(out_dir / "dataset.json")


def ensure_demo_dataset(dataset_dir: str | Path) -> str:
    """For bundles: the dataset.json in ``dataset_dir``, writing a demo there on first use.

    Only a default demo location receives a demo (``demo_task_for_folder``: a folder named
    ``mni152_demo`` or ``medsaga_demo`` gets the MNI152 demo, ``aal_small_structures`` the
    small-structure task); any other ``dataset_dir`` without a dataset.json raises
    ``DatasetError`` naming it, so that a mistyped path fails instead of training on the demo.
    A user dataset already in ``dataset_dir`` (any dataset.json) is returned untouched. A demo
    written by an older version of this code (another split) is rewritten as the same task, so
    that a bundle's results always refer to the split its docs describe.
    """
    json_path = Path(dataset_dir) / "dataset.json"
    if not json_path.is_file():
        task = demo_task_for_folder(dataset_dir)
        if task is None:
            where = Path(dataset_dir).resolve()
            state = "is a folder without a dataset.json" if where.is_dir() else "does not exist"
            raise DatasetError(
                f"dataset_dir {where} {state}; expected a Medical Segmentation Decathlon folder with a "
                f"dataset.json. Only a default demo location ({', '.join(sorted(DEMO_LOCATIONS))}) receives "
                f"the demo automatically; to write the demo elsewhere run: medsaga demo-data --out {where}"
            )
        return write_demo_dataset(str(dataset_dir), task=task)
    marker = _demo_marker(json_path)
    if marker is not None and marker[0] in DEMO_TASKS and marker[1] != DEMO_VERSIONS[marker[0]]:
        task, version = marker
        logger.warning("%s holds %s demo version %s; rewriting it as version %s", json_path, task, version,
                       DEMO_VERSIONS[task])
        return write_demo_dataset(str(dataset_dir), overwrite=True, task=task)
    return str(json_path.resolve())


def _demo_marker(json_path: Path) -> tuple[str, int] | None:
    """(task, version) of the demo recorded in ``json_path``; None for any other dataset.json.

    The MNI152 demo's marker names no task (it predates the others).
    """
    try:
        marker = json.loads(json_path.read_text(encoding="utf-8")).get("medsaga_demo")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(marker, dict) or marker.get("version") is None:
        return None
    return marker.get("task", MNI152), marker["version"]
