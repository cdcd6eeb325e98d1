"""Predictions as DICOM SEG (``inference.dicom_seg``, ``inference.writer.prediction_saver``), on a real
DICOM series: a synthetic CT written with pydicom under shuffled file names, slices descending
in patient z. Every check that matters goes back to the source files themselves: each SEG frame
must point at the instance whose own pixels hold that slice."""

import json
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor, PydicomReader
from monai.transforms import LoadImage

from bundle_runs import REPO, configs, run_bundle
from dicom_series import RESCALE_INTERCEPT, RESCALE_SLOPE, write_ct_series
from medsaga_components.data.dicom_series import check_series
from medsaga_components.engine import prediction_saver
from medsaga_components.inference.dicom_seg import DicomSegError, read_dicom_seg, write_dicom_seg

SHAPE = (48, 40, 12)  # [X, Y, Z] = 48 columns, 40 rows, 12 slices
CLASS_NAMES = ["background", "bone", "contrast"]
BONE_HU, CONTRAST_HU = 300, 1200  # a voxel's class is read from its own HU: no z mapping needed to check


def _volume(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    volume = rng.integers(-1000, 200, size=SHAPE).astype(np.int16)
    for z in range(SHAPE[2]):  # a different blob on every slice, so that slices cannot be swapped unnoticed
        volume[3 + z:13 + 2 * z, 4:12 + z, z] = 700
        volume[30 - z:36, 20 + z:30 + z, z] = 1500
    volume[:, :, 0] = -1000  # an empty slice: its frames are left out and read back as background
    return volume


def _labels_of(hounsfield: np.ndarray) -> np.ndarray:
    return ((hounsfield >= BONE_HU).astype(np.uint8) + (hounsfield >= CONTRAST_HU)).astype(np.uint8)


def _load(folder):
    return LoadImage(image_only=True, reader=PydicomReader())(str(folder))


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """(series folder, volume [X, Y, Z] HU) in its own folder ``ct.1.2``: a name with dots."""
    volume = _volume()
    folder = tmp_path_factory.mktemp("dicom") / "ct.1.2"
    write_ct_series(folder, volume, spacing=(0.8, 0.8, 2.5), origin=(-20.0, -16.0, 30.0))
    return folder, volume


@pytest.mark.parametrize("spacing,descending_z", [((0.8, 0.8, 2.5), True), ((0.7, 0.9, 2.0), False)])
def test_the_series_helper_writes_what_pydicom_reader_reads(tmp_path, spacing, descending_z):
    volume = _volume(1)
    files = write_ct_series(tmp_path / "s", volume, spacing=spacing, origin=(5.0, -7.0, 12.0),
                            descending_z=descending_z)
    assert [f.name for f in files] != sorted(f.name for f in files)  # file names do not follow z
    image = _load(tmp_path / "s")
    assert tuple(image.shape) == SHAPE
    np.testing.assert_array_equal(np.asarray(image), volume)
    step = -spacing[2] if descending_z else spacing[2]
    expected = np.diag([-spacing[0], -spacing[1], step, 1.0])
    expected[:3, 3] = [-5.0, 7.0, 12.0]  # first slice's ImagePositionPatient, x and y negated (LPS -> RAS)
    np.testing.assert_allclose(image.affine.numpy(), expected, atol=1e-6)
    info = check_series(tmp_path / "s")
    np.testing.assert_allclose(info.affine, expected, atol=1e-6)


def test_a_label_map_comes_back_from_its_seg_unchanged(series, tmp_path):
    folder, volume = series
    labels = _labels_of(volume)
    assert set(np.unique(labels)) == {0, 1, 2}
    written = write_dicom_seg(labels, folder, CLASS_NAMES, tmp_path / "out" / "ct_seg.dcm")
    assert written == tmp_path / "out" / "ct_seg.dcm"
    back = read_dicom_seg(written, folder)
    assert back.shape == SHAPE
    np.testing.assert_array_equal(back, labels)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ct_seg.dcm"]  # no temporary file left


def test_each_frame_points_at_the_instance_whose_pixels_hold_that_slice(series, tmp_path):
    folder, volume = series
    seg = pydicom.dcmread(str(write_dicom_seg(_labels_of(volume), folder, CLASS_NAMES, tmp_path / "seg.dcm")))
    sources = {}
    for path in folder.iterdir():
        ds = pydicom.dcmread(str(path))
        sources[ds.SOPInstanceUID] = ds
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    referenced = set()
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = sources[uid]
        hounsfield = source.pixel_array * RESCALE_SLOPE + RESCALE_INTERCEPT  # [rows, columns], straight from the file
        np.testing.assert_array_equal(frame.astype(bool), _labels_of(hounsfield) == segment,
                                      err_msg=f"frame of segment {segment} -> {uid}")
        np.testing.assert_allclose(item.PlanePositionSequence[0].ImagePositionPatient, source.ImagePositionPatient)
        referenced.add(uid)
    assert len(frames) > SHAPE[2]  # two segments on most slices
    assert len(referenced) == SHAPE[2] - 1  # every slice but the empty one
    assert {str(s.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} \
        == set(sources)


def test_segments_are_the_declared_classes_labelled_with_their_names(series, tmp_path):
    folder, volume = series
    only_bone = np.minimum(_labels_of(volume), 1)  # class 2 absent from this volume: still a segment
    seg = pydicom.dcmread(str(write_dicom_seg(only_bone, folder, {"bone": 1, "contrast": 2}, tmp_path / "seg.dcm",
                                              model_name="samed")))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == CLASS_NAMES[1:]
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2]
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "medsaga" and algorithm.AlgorithmParameters == "model=samed"
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    source = pydicom.dcmread(str(next(folder.iterdir())), stop_before_pixels=True)
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == source.PatientID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "seg.dcm", folder), only_bone)


def test_slices_are_matched_by_geometry_not_by_array_order(series, tmp_path):
    """The same label map stored upside down along z, with the affine saying so, gives the same SEG."""
    folder, volume = series
    labels = _labels_of(volume)
    affine = _load(folder).affine.numpy()
    flipped_affine = affine.copy()
    flipped_affine[:3, 3] = affine[:3, 3] + (SHAPE[2] - 1) * affine[:3, 2]
    flipped_affine[:3, 2] = -affine[:3, 2]
    write_dicom_seg(labels[:, :, ::-1], folder, CLASS_NAMES, tmp_path / "seg.dcm", affine=flipped_affine)
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "seg.dcm", folder), labels)
    half_a_slice_off = affine.copy()
    half_a_slice_off[:3, 3] += 0.5 * affine[:3, 2]
    with pytest.raises(DicomSegError, match="z index"):
        write_dicom_seg(labels, folder, CLASS_NAMES, tmp_path / "off.dcm", affine=half_a_slice_off)
    transposed = affine[:, [1, 0, 2, 3]]
    with pytest.raises(DicomSegError, match="columns, rows, slices"):
        write_dicom_seg(labels, folder, CLASS_NAMES, tmp_path / "t.dcm", affine=transposed)
    assert not (tmp_path / "off.dcm").exists() and not (tmp_path / "t.dcm").exists()


def test_a_label_map_of_another_shape_is_refused_naming_the_file(series, tmp_path):
    folder, volume = series
    out = tmp_path / "seg.dcm"
    with pytest.raises(DicomSegError, match="shape") as error:
        write_dicom_seg(_labels_of(volume).transpose(1, 0, 2), folder, CLASS_NAMES, out)
    assert str(out) in str(error.value) and str(folder) in str(error.value)
    with pytest.raises(DicomSegError, match=r"class indices \[3\]"):
        write_dicom_seg(np.full(SHAPE, 3, np.uint8), folder, CLASS_NAMES, out)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_is_not_one_series_is_refused_naming_it(series, tmp_path):
    folder, volume = series
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    write_ct_series(tmp_path / "other", _volume(2)[:, :, :2])
    shutil.copy(next((tmp_path / "other").iterdir()), mixed / "zz_other.dcm")
    with pytest.raises(ValueError, match="2 DICOM series") as error:
        write_dicom_seg(_labels_of(volume), mixed, CLASS_NAMES, tmp_path / "seg.dcm")
    assert str(mixed) in str(error.value)
    not_dicom = tmp_path / "notes"
    not_dicom.mkdir()
    (not_dicom / "readme.txt").write_text("not an image")
    with pytest.raises(ValueError, match="readme.txt"):
        write_dicom_seg(_labels_of(volume), not_dicom, CLASS_NAMES, tmp_path / "seg.dcm")


def _prediction(folder, labels: np.ndarray) -> MetaTensor:
    """What ``run inference`` hands ``SaveImaged``: [1, X, Y, Z] with the loaded series' metadata."""
    image = _load(folder)
    return MetaTensor(torch.as_tensor(labels[None].astype(np.float32)), meta=dict(image.meta))


def test_the_dicom_seg_saver_writes_series_name_seg_dcm_and_nothing_else(series, tmp_path):
    folder, volume = series
    labels = _labels_of(volume)
    saver = prediction_saver(tmp_path / "out", "dicom_seg", {"bone": 1, "contrast": 2}, "medsaga")
    saver({"pred": _prediction(folder, labels)})
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ct.1.2_seg.dcm"]
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "out" / "ct.1.2_seg.dcm", folder), labels)
    assert [p.name for p in folder.iterdir() if not p.name.startswith("IM")] == []  # nothing written into the series


def test_series_folders_of_one_name_are_named_by_their_path_below_the_dataset(series, tmp_path):
    """``pat_1/CT`` and ``pat_2/CT`` (how PACS exports lay series out) do not overwrite each other."""
    folder, volume = series
    labels = _labels_of(volume)
    for patient in ("pat_1", "pat_2"):
        shutil.copytree(folder, tmp_path / "data" / patient / "CT")
    for output_format, ext in (("nifti", "nii.gz"), ("dicom_seg", "dcm")):
        saver = prediction_saver(tmp_path / output_format, output_format, {"bone": 1, "contrast": 2}, "medsaga",
                                 tmp_path / "data")
        for patient in ("pat_1", "pat_2"):
            saver({"pred": _prediction(tmp_path / "data" / patient / "CT", labels)})
        assert sorted(p.name for p in (tmp_path / output_format).iterdir()) == [f"pat_1_CT_seg.{ext}",
                                                                               f"pat_2_CT_seg.{ext}"]


def test_the_dicom_seg_saver_refuses_an_input_that_is_not_a_dicom_series(tmp_path):
    nifti = tmp_path / "case0.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), np.eye(4)), str(nifti))
    saver = prediction_saver(tmp_path / "out", "dicom_seg", {"bone": 1})
    pred = MetaTensor(torch.zeros(1, 4, 4, 3), meta={"filename_or_obj": str(nifti)})
    with pytest.raises(ValueError, match="needs a DICOM series input") as error:
        saver({"pred": pred})
    assert str(nifti) in str(error.value)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_nifti_stays_the_default_output(series, tmp_path):
    nifti = tmp_path / "case0.nii.gz"
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), affine), str(nifti))
    labels = np.zeros((6, 5, 4), np.uint8)
    labels[1:3, 2:4, 1:3] = 2
    pred = MetaTensor(torch.as_tensor(labels[None].astype(np.float32)), affine=torch.as_tensor(affine),
                      meta={"filename_or_obj": str(nifti)})
    prediction_saver(tmp_path / "out", "nifti", {"bone": 1, "contrast": 2})({"pred": pred})
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["case0_seg.nii.gz"]
    written = nib.load(str(tmp_path / "out" / "case0_seg.nii.gz"))
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels)
    np.testing.assert_allclose(written.affine, affine)
    for bundle in ("medsaga", "samed", "ssam", "cheap_lunch", "mcp_medsam"):
        config = json.loads((REPO / "bundles" / bundle / "configs" / "inference.json").read_text())
        assert config["output_format"] == "nifti", bundle


def test_an_unknown_output_format_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match="output_format 'dicom'.*'nifti', 'dicom_seg'"):
        prediction_saver(tmp_path, "dicom", CLASS_NAMES)
    with pytest.raises(ValueError, match="class names"):
        prediction_saver(tmp_path, "dicom_seg", None)


@pytest.mark.slow
def test_run_inference_writes_a_dicom_seg_of_a_series(series, tmp_path):
    """``python -m monai.bundle run inference --output_format dicom_seg`` on a folder holding the series."""
    from medsaga_components import SamSegmenter

    folder, volume = series
    data = tmp_path / "data"
    shutil.copytree(folder, data / folder.name)
    (tmp_path / "models").mkdir()
    torch.manual_seed(0)
    network = SamSegmenter("lite_medsam_tiny", 2, checkpoint=None, image_size=64)
    torch.save(network.state_dict(), tmp_path / "models" / "model.pt")
    out = tmp_path / "inference"
    run_bundle("inference", configs("medsaga", "inference"), "--bundle_root", str(tmp_path), "--dataset_dir",
               str(data), "--output_dir", str(out), "--output_format", "dicom_seg", "--backbone",
               "lite_medsam_tiny", "--image_size", "64", "--test_time_flips", "False",
               "--keep_freed_cpu_memory", "False")
    assert [p.name for p in out.iterdir()] == ["ct.1.2_seg.dcm"]
    seg = pydicom.dcmread(str(out / "ct.1.2_seg.dcm"))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["grey matter", "white matter"]  # the bundle's classes
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == check_series(folder).series_uid
    labels = read_dicom_seg(out / "ct.1.2_seg.dcm", folder)
    assert labels.shape == SHAPE and set(np.unique(labels)) <= {0, 1, 2}
