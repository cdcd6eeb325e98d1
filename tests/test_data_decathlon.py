"""dataset.json loading/validation, label mapping, slicing, intensity and square resize."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from data_synthetic import SPACING, affine_with_spacing, save, write_dataset
from medsaga_components.data import (
    DatasetError,
    SliceDataset,
    SliceRef,
    SquareGeometry,
    load_decathlon,
    resize_pad_image,
    resize_pad_labels,
    slab_affine,
    slices_to_volume,
    undo_resize_pad_labels,
    validate_dataset,
    volume_to_slices,
)
from medsaga_components.data.intensity import scale_intensity


def test_load_decathlon_reads_labels_modality_and_splits(tmp_path):
    path = write_dataset(tmp_path, n_training=2, n_validation=1, n_test=1)
    dataset = load_decathlon(tmp_path)  # the folder works as well as the file
    assert dataset.path == path.resolve()
    assert dataset.modality == "MRI"
    assert dataset.class_names == ("background", "ring", "blob")
    assert [len(dataset.entries(s)) for s in ("training", "validation", "test")] == [2, 1, 1]
    entry = dataset.entries("training")[1]
    assert entry.image == "imagesTr/case1.nii.gz" and entry.image_path == (tmp_path / entry.image).resolve()
    assert validate_dataset(path).num_classes == 3


def test_label_values_with_gaps_map_to_contiguous_indices(tmp_path):
    write_dataset(tmp_path, n_training=1, label_values=(0, 1, 4))
    class_map = validate_dataset(tmp_path).class_map
    values = np.array([[0, 4], [1, 4]])
    indices = class_map.to_indices(values)
    assert indices.tolist() == [[0, 2], [1, 2]]
    assert class_map.to_values(indices).tolist() == values.tolist()
    with pytest.raises(ValueError, match=r"\[3\]"):
        class_map.to_indices(np.array([0, 3]))


def _break(tmp_path, how: str):
    path = write_dataset(tmp_path, n_training=2)
    target = tmp_path / "labelsTr" / "case1.nii.gz"
    labels = np.asarray(nib.load(str(target)).dataobj)
    affine = affine_with_spacing()
    if how == "missing":
        (tmp_path / "imagesTr" / "case1.nii.gz").unlink()
        return path, "imagesTr/case1.nii.gz", "not found"
    if how == "shape":
        save(labels[:, :, :-1], affine, target)
        return path, "labelsTr/case1.nii.gz", "shape"
    if how == "affine":
        save(labels, affine_with_spacing(origin=(0.0, 0.0, 0.0)), target)
        return path, "labelsTr/case1.nii.gz", "affine"
    if how == "undeclared":
        labels = labels.copy()
        labels[0, 0, 0] = 7
        save(labels, affine, target)
        return path, "labelsTr/case1.nii.gz", r"label values \[7\] are not declared"
    if how == "empty":
        save(np.zeros_like(labels), affine, target)
        return path, "labelsTr/case1.nii.gz", "no labelled voxel"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing", "shape", "affine", "undeclared", "empty"])
def test_validate_dataset_names_the_broken_file(tmp_path, how):
    path, broken_file, reason = _break(tmp_path, how)
    with pytest.raises(DatasetError, match=reason) as info:
        validate_dataset(path)
    message = str(info.value)
    assert broken_file in message
    assert len(info.value.problems) == 1  # the intact volume case0 is not blamed
    assert "case0" not in message


def test_dataset_json_errors_name_the_json_and_key(tmp_path):
    path = write_dataset(tmp_path, n_training=1)
    raw = json.loads(path.read_text())
    del raw["labels"]
    path.write_text(json.dumps(raw))
    with pytest.raises(DatasetError, match="missing key 'labels'") as info:
        load_decathlon(path)
    assert str(path.resolve()) in str(info.value)
    raw["labels"] = {"1": "liver"}
    path.write_text(json.dumps(raw))
    with pytest.raises(DatasetError, match="background"):
        load_decathlon(path)
    with pytest.raises(DatasetError, match="dataset.json not found"):
        load_decathlon(tmp_path / "nowhere")


def test_an_image_in_two_splits_is_refused(tmp_path):
    path = write_dataset(tmp_path, n_training=2)
    raw = json.loads(path.read_text())
    raw["test"] = [raw["training"][0]["image"]]
    path.write_text(json.dumps(raw))
    with pytest.raises(DatasetError, match="both 'training' and 'test'"):
        load_decathlon(path)


def test_png_image_and_mask_pairs(tmp_path):
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 60), (50, 30)]):
        (tmp_path / "img").mkdir(exist_ok=True), (tmp_path / "mask").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB").save(tmp_path / "img" / f"{i}.png")
        mask = np.zeros((h, w), np.uint8)
        mask[5:15, 5:20] = 1
        mask[20:25, 2:8] = 2
        Image.fromarray(mask, "L").save(tmp_path / "mask" / f"{i}.png")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "modality": "photo", "labels": {"0": "background", "1": "polyp", "2": "tool"},
        "training": [{"image": f"img/{i}.png", "label": f"mask/{i}.png"} for i in range(2)]}))
    dataset = validate_dataset(tmp_path)
    samples = SliceDataset(dataset, [SliceRef("img/1.png", "mask/1.png", 2, 0)], image_size=64)
    sample = samples[0]
    assert sample["image"].shape == (1, 64, 64) and sample["image"].dtype == torch.float32
    assert sample["geometry"].tolist() == [50, 30, 64, 38, 64]
    back = undo_resize_pad_labels(sample["label"][0].numpy(), SquareGeometry.from_values(sample["geometry"]))
    assert np.array_equal(back, np.asarray(Image.open(tmp_path / "mask" / "1.png")))
    # A mask value the json does not declare is caught, naming the PNG.
    bad = np.zeros((40, 60), np.uint8)
    bad[3, 3] = 9
    Image.fromarray(bad, "L").save(tmp_path / "mask" / "0.png")
    with pytest.raises(DatasetError, match=r"mask/0.png: label values \[9\]"):
        validate_dataset(tmp_path)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slicing_and_restacking_is_lossless(axis):
    volume = np.random.default_rng(axis).integers(0, 5, (7, 9, 11))
    slices = volume_to_slices(volume, axis)
    assert slices.shape[0] == volume.shape[axis]
    assert np.array_equal(slices[3], np.take(volume, 3, axis=axis))
    assert np.array_equal(slices_to_volume(slices, axis), volume)


@pytest.mark.parametrize("shape", [(197, 233), (37, 53), (256, 100), (5, 250), (64, 64), (1, 7)])
def test_resize_pad_undo_is_exact_for_label_maps(shape):
    labels = np.random.default_rng(sum(shape)).integers(0, 4, shape)
    square, geometry = resize_pad_labels(labels, 256)
    assert square.shape == (256, 256) and square.dtype == np.int64
    assert max(geometry.resized_height, geometry.resized_width) == 256
    # padding is bottom/right and background
    assert not square[geometry.resized_height:].any() and not square[:, geometry.resized_width:].any()
    assert np.array_equal(undo_resize_pad_labels(square, geometry), labels)
    assert SquareGeometry.from_values(geometry.as_tensor()) == geometry


def test_downscaled_labels_return_to_the_original_grid():
    # Constant 2x2 blocks survive a 2x downscale exactly; finer detail cannot.
    blocks = np.random.default_rng(1).integers(0, 3, (256, 150))
    labels = np.kron(blocks, np.ones((2, 2), dtype=np.int64))  # [512, 300]
    square, geometry = resize_pad_labels(labels, 256)
    assert (geometry.resized_height, geometry.resized_width) == (256, 150)
    assert np.array_equal(undo_resize_pad_labels(square, geometry), labels)


def test_resize_pad_image_keeps_aspect_and_range():
    image = np.linspace(0, 1, 30 * 60, dtype=np.float32).reshape(30, 60)
    square, geometry = resize_pad_image(image, 128)
    assert (geometry.resized_height, geometry.resized_width) == (64, 128)
    assert square.dtype == np.float32 and square.min() >= 0 and square.max() <= 1
    assert not square[64:].any()
    assert square[:64].mean() == pytest.approx(image.mean(), abs=0.01)


def test_intensity_scaling_by_modality():
    hu = np.array([-1000.0, -125.0, 75.0, 275.0, 3000.0])
    assert scale_intensity(hu, "CT").tolist() == pytest.approx([0, 0, 0.5, 1, 1])
    mri = np.random.default_rng(0).gamma(2.0, 100.0, 10000)
    scaled = scale_intensity(mri, "MRI")
    assert scaled.dtype == np.float32 and scaled.min() == 0 and scaled.max() == 1
    assert np.mean(scaled == 1) == pytest.approx(0.01, abs=0.002)  # the top 1 % saturates
    assert not scale_intensity(np.full(10, 5.0), "MRI").any()  # constant volume: zeros, not NaN


def test_slab_affine_keeps_world_positions():
    affine = affine_with_spacing()
    affine[:3, :3] = affine[:3, :3] @ np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]])  # rotated grid
    shifted = slab_affine(affine, axis=2, start=5)
    voxel = np.array([3, 4, 2, 1])
    assert np.allclose(shifted @ voxel, affine @ (voxel + [0, 0, 5, 0]))
    assert np.linalg.norm(shifted[:3, 2]) == pytest.approx(SPACING[2])
