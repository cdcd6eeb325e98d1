"""A real PACS behind MONAI Label: Orthanc with its DICOMweb plugin (Debian's packages, installed
by scripts/setup_env.sh) and the app started with ``--studies http://127.0.0.1:<port>/dicom-web``,
MONAI Label's DICOMweb datastore, both on loopback.

The PACS holds two CT series of the radiomics phantom (``radiomics_phantom``): patient 1 with its
RTSTRUCT (a study as a planning system leaves it, no SEG), patient 2 with a DICOM SEG of its
RTSTRUCT written elsewhere (by medsaga's ``run inference --output_format dicom_seg`` writer:
highdicom, only the frames that hold a segment). Labels are the GTV of the RTSTRUCT (class 1) and the
denser tissue around it (class 2, HU > -400). Shown, against the real servers:

* only the CT series are the studies, and the one without a SEG is offered for labelling;
* a label saved through the app (``PUT /datastore/label``) lands in Orthanc as a SEG series of
  the CT's study that references the CT series, voxel for voxel (an empty one is refused);
* training runs over the labels stored in the PACS (both series: the SEG from the other tool is
  downloaded and converted), through ``POST /train/medsaga``;
* an infer request with ``{"save_label": true, "label_tag": "final"}`` is answered, and its
  label is stored in Orthanc as a SEG, voxel for voxel.

One Orthanc and one app start for the module; about a minute once MONAI Label is installed.
"""

import io
import json
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from bundle_runs import REPO, TINY_TRAINING
from medsaga_components.data.dicom_series import check_series
from medsaga_components.data.radiomics_phantom import ct_folder, ensure_radiomics_phantom, rtstruct_file
from medsaga_components.data.volume_io import read_label
from medsaga_components.inference.dicom_seg import write_dicom_seg
from orthanc_server import OrthancServer

sys.path.insert(0, str(REPO / "monailabel_app"))
from client import LabelServerError  # noqa: E402
from harness import LabelServer, monailabel_python  # noqa: E402

_tiny = dict(zip(TINY_TRAINING[::2], TINY_TRAINING[1::2]))
OVERRIDES = {"backbone": _tiny["--backbone"], "image_size": int(_tiny["--image_size"]), "checkpoint": None}
TRAIN_OVERRIDES = {k[2:]: int(v) for k, v in _tiny.items() if k[2:] not in OVERRIDES}
LABELS = {"grey matter": 1, "white matter": 2}  # the served bundle's label names (its channel_def)


# --- DICOM on the test's side: the CT slices, the RTSTRUCT's GTV, SEG frames -------------------

def ct_slices(folder: Path) -> list[pydicom.Dataset]:
    """The series' slices, sorted along z (axial, rows along y and columns along x)."""
    slices = sorted((pydicom.dcmread(f) for f in folder.glob("*.dcm")), key=lambda d: float(d.ImagePositionPatient[2]))
    for d in slices:
        assert [float(v) for v in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0], "axial slices expected"
    return slices


def _pixel_index(slices: list[pydicom.Dataset], x, y, z):
    """(slice, row, column) of patient coordinates (LPS mm), as floats and the nearest slice."""
    x0, y0 = (float(v) for v in slices[0].ImagePositionPatient[:2])
    row_mm, col_mm = (float(v) for v in slices[0].PixelSpacing)
    zs = np.array([float(d.ImagePositionPatient[2]) for d in slices])
    k = np.abs(zs[None] - np.asarray(z, float).reshape(-1, 1)).argmin(1)
    return k, (np.asarray(y) - y0) / row_mm, (np.asarray(x) - x0) / col_mm


def label_stack(slices: list[pydicom.Dataset], rtstruct: Path) -> np.ndarray:
    """[slice, row, column] uint8: 1 inside the RTSTRUCT's GTV (medsaga's RTSTRUCT reader), 2 for
    HU > -400 elsewhere; slices in the order of ``slices`` (along z)."""
    series = rtstruct.parent / "CT"
    gtv = read_label(rtstruct, series, {"GTV-1": 1})[0].transpose(2, 1, 0) == 1  # reader's slice order
    gtv = gtv[np.argsort(check_series(series).positions)]  # -> along z, as ``slices``
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in slices])
    labels = np.where(hu > -400, 2, 0).astype(np.uint8)
    labels[gtv] = 1
    assert gtv.any() and (labels == 2).any()
    return labels


def on_grid(stack: np.ndarray, slices: list[pydicom.Dataset], image: nib.Nifti1Image) -> np.ndarray:
    """A [slice, row, column] array sampled at the voxels of a NIfTI image of the same series
    (NIfTI world coordinates are RAS, DICOM's LPS)."""
    ijk = np.indices(image.shape[:3]).reshape(3, -1)
    ras = image.affine[:3, :3] @ ijk + image.affine[:3, 3:]
    k, rows, cols = _pixel_index(slices, -ras[0], -ras[1], ras[2])
    rows, cols = np.rint(rows).astype(int), np.rint(cols).astype(int)
    assert rows.min() >= 0 and cols.min() >= 0 and rows.max() < stack.shape[1] and cols.max() < stack.shape[2]
    return stack[k, rows, cols].reshape(image.shape[:3])


def seg_label_stack(seg: pydicom.Dataset, slices: list[pydicom.Dataset]) -> np.ndarray:
    """A DICOM SEG's frames as [slice, row, column] segment numbers, each frame placed by its
    plane position (frames of overlapping segments would be an error)."""
    assert seg.Modality == "SEG" and (seg.Rows, seg.Columns) == (slices[0].Rows, slices[0].Columns)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    stack = np.zeros((len(slices), seg.Rows, seg.Columns), np.uint8)
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        x, y, z = (float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient)
        k, row, col = _pixel_index(slices, x, y, z)
        assert abs(row) < 1e-3 and abs(col) < 1e-3, "full frames expected"
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        assert not (stack[k[0]][frame > 0]).any(), "overlapping segments"
        stack[k[0]][frame > 0] = number
    return stack


def seg_from_another_tool(series: Path, slices: list[pydicom.Dataset], labels: np.ndarray, out: Path) -> Path:
    """A DICOM SEG as medsaga's ``run inference --output_format dicom_seg`` writes it (highdicom;
    only the frames that hold a segment), for a PACS that already holds SEGs from elsewhere.
    ``labels`` [slice, row, column] goes in as [column, row, slice] with its RAS affine."""
    (x0, y0, z0), z1 = (float(v) for v in slices[0].ImagePositionPatient), float(slices[1].ImagePositionPatient[2])
    row_mm, col_mm = (float(v) for v in slices[0].PixelSpacing)
    affine = np.array([[-col_mm, 0, 0, -x0], [0, -row_mm, 0, -y0], [0, 0, z1 - z0, z0], [0, 0, 0, 1]])
    return write_dicom_seg(labels.transpose(2, 1, 0), series, LABELS, out, affine=affine, model_name="another tool")


# --- the PACS and the app ----------------------------------------------------------------------

def seg_series(orthanc: OrthancServer) -> dict[str, pydicom.Dataset]:
    """``{SeriesInstanceUID: its (first) instance}`` of every SEG series in Orthanc."""
    found = {}
    for series in orthanc.get("/series?expand"):
        if series["MainDicomTags"].get("Modality") == "SEG":
            payload = orthanc.download(series["Instances"][0])
            found[series["MainDicomTags"]["SeriesInstanceUID"]] = pydicom.dcmread(io.BytesIO(payload))
    return found


def references(seg: pydicom.Dataset) -> str:
    return str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)


def load_nifti(payload: bytes) -> nib.Nifti1Image:
    path = Path(tempfile.mkdtemp()) / "volume.nii.gz"
    path.write_bytes(payload)
    image = nib.load(path)
    return nib.Nifti1Image(np.asarray(image.dataobj), image.affine)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    phantom = ensure_radiomics_phantom()
    work = tmp_path_factory.mktemp("pacs")
    patients = {}
    for patient in ("pat_1", "pat_2"):
        slices = ct_slices(ct_folder(phantom, patient))
        patients[patient] = {"slices": slices, "series": str(slices[0].SeriesInstanceUID),
                             "study": str(slices[0].StudyInstanceUID),
                             "labels": label_stack(slices, rtstruct_file(phantom, patient))}
    orthanc = OrthancServer(work / "orthanc")
    server = None
    try:
        orthanc.wait_until_up()
        for f in sorted(ct_folder(phantom, "pat_1").glob("*.dcm")) + [rtstruct_file(phantom, "pat_1")]:
            orthanc.upload(f)
        for f in sorted(ct_folder(phantom, "pat_2").glob("*.dcm")):
            orthanc.upload(f)
        pat_2 = patients["pat_2"]
        orthanc.upload(seg_from_another_tool(ct_folder(phantom, "pat_2"), pat_2["slices"], pat_2["labels"],
                                             work / "pat_2_seg.dcm"))

        shutil.copytree(REPO / "bundles" / "medsaga" / "configs", work / "bundles" / "medsaga" / "configs")
        server = LabelServer(monailabel_python(), orthanc.dicomweb, work / "bundles", work / "server.log",
                             conf={"overrides": OVERRIDES, "train_overrides": TRAIN_OVERRIDES, "modality": "CT"},
                             env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work / "cache")})
        server.wait_until_up(600)
        yield orthanc, server, patients, work
    finally:
        if server is not None:
            assert server.stop() is not None
            print((work / "server.log").read_text()[-3000:])
        assert orthanc.stop() is not None


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent; picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.mark.slow
def test_the_ct_series_in_the_pacs_are_the_studies(pacs):
    orthanc, server, patients, _ = pacs
    info = server.client.info()
    assert "medsaga" in info["models"] and "medsaga" in info["trainers"]
    # MONAI Label's active learning offers the CT series without a SEG: patient 1 (patient 2's
    # series has one, the RTSTRUCT and SEG series are not images).
    sample = server.client.json("POST", "/activelearning/random", body={})
    assert sample["id"] == patients["pat_1"]["series"]
    # Orthanc answers local clients only (RemoteAccessAllowed false)
    address = _non_loopback_address()
    if address is not None:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://{address}:{orthanc.port}/system", timeout=10)
        assert refused.value.code in (401, 403)


@pytest.mark.slow
def test_a_saved_label_lands_in_the_pacs_as_seg(pacs):
    orthanc, server, patients, work = pacs
    pat_1 = patients["pat_1"]
    before = seg_series(orthanc)
    image = load_nifti(server.client.request("GET", "/datastore/image", query={"image": pat_1["series"]})[0])
    label = on_grid(pat_1["labels"], pat_1["slices"], image)
    nib.save(nib.Nifti1Image(np.zeros_like(label), image.affine), work / "empty_label.nii.gz")
    with pytest.raises(LabelServerError) as refused:  # a SEG needs a segment
        server.client.save_label(pat_1["series"], work / "empty_label.nii.gz")
    assert refused.value.status == 422 and "is empty" in refused.value.body
    assert seg_series(orthanc).keys() == before.keys()
    nib.save(nib.Nifti1Image(label, image.affine), work / "pat_1_label.nii.gz")
    saved = server.client.save_label(pat_1["series"], work / "pat_1_label.nii.gz")
    assert saved["label"] == pat_1["series"]

    new = {uid: seg for uid, seg in seg_series(orthanc).items() if uid not in before}
    assert len(new) == 1, new.keys()
    seg = next(iter(new.values()))
    assert references(seg) == pat_1["series"] and seg.StudyInstanceUID == pat_1["study"]
    assert seg.PatientID == pat_1["slices"][0].PatientID
    assert {s.SegmentNumber: s.SegmentLabel for s in seg.SegmentSequence} == {v: k for k, v in LABELS.items()}
    np.testing.assert_array_equal(seg_label_stack(seg, pat_1["slices"]), pat_1["labels"])


@pytest.mark.slow
def test_training_from_the_labels_in_the_pacs(pacs):
    orthanc, server, patients, work = pacs
    assert len(seg_series(orthanc)) == 2, "runs after the saved label's test"
    started = time.time()
    server.client.train("medsaga")
    task = server.client.wait_for_training(900)
    assert task["status"] == "DONE", task
    training = next((work / "cache").glob("*/.medsaga_training/medsaga"))
    stats = json.loads((training / "last_run.json").read_text())
    assert stats["returncode"] == 0 and stats["images"] == 2
    assert Path(stats["model_path"]).is_file() and Path(stats["model_path"]).stat().st_mtime > started
    # Patient 2's label came from the other tool's SEG in Orthanc, downloaded and converted onto its image
    dataset = json.loads((training / "dataset" / "dataset.json").read_text())
    pat_2 = patients["pat_2"]
    entry = next(e for e in dataset["training"] if Path(e["image"]).name.startswith(pat_2["series"]))
    image, label = nib.load(entry["image"]), nib.load(entry["label"])
    np.testing.assert_allclose(label.affine, image.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(label.dataobj), on_grid(pat_2["labels"], pat_2["slices"], image))


@pytest.mark.slow
def test_an_infer_result_is_stored_in_the_pacs_as_seg(pacs):
    orthanc, server, patients, _ = pacs
    pat_1 = patients["pat_1"]
    before = seg_series(orthanc)
    payload, params = server.client.infer("medsaga", pat_1["series"], {"save_label": True, "label_tag": "final"})
    label = load_nifti(payload)
    first = pat_1["slices"][0]
    assert label.shape == (first.Columns, first.Rows, len(pat_1["slices"]))
    values = set(np.unique(np.asarray(label.dataobj)).tolist())
    assert values <= {0, *LABELS.values()} and values != {0}

    new = {uid: seg for uid, seg in seg_series(orthanc).items() if uid not in before}
    assert len(new) == 1, new.keys()
    seg = next(iter(new.values()))
    assert references(seg) == pat_1["series"] and seg.StudyInstanceUID == pat_1["study"]
    assert {s.SegmentLabel for s in seg.SegmentSequence} == {k for k, v in LABELS.items() if v in values}
    stored = on_grid(seg_label_stack(seg, pat_1["slices"]), pat_1["slices"], label)
    np.testing.assert_array_equal(stored, np.asarray(label.dataobj))
