"""The embedded MNI152 demo dataset: labels, split disjointness, geometry, idempotent writing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from demo_checks import assert_slabs_are_template_crops

from medsaga_components.data import ensure_demo_dataset, load_decathlon, validate_dataset, write_demo_dataset
from medsaga_components.data import demo


@pytest.fixture(scope="module")
def demo_json(tmp_path_factory) -> Path:
    return Path(write_demo_dataset(str(tmp_path_factory.mktemp("demo") / "mni")))


@pytest.fixture(scope="module")
def template():
    folder = demo.template_dir()
    t1 = nib.load(str(folder / demo.TEMPLATE_FILES["t1"]))
    return np.asarray(t1.dataobj), t1.affine


def _world_z_range(path: Path) -> tuple[float, float]:
    image = nib.load(str(path))
    corners = image.affine @ np.array([[0, 0, 0, 1], [0, 0, image.shape[2] - 1, 1]]).T
    return float(corners[2].min()), float(corners[2].max())


def test_demo_is_a_valid_three_class_dataset(demo_json):
    dataset = validate_dataset(demo_json)
    assert dataset.class_names == ("background", "grey matter", "white matter")
    assert dataset.modality == "MRI"
    for split in ("training", "validation", "test"):
        entries = dataset.entries(split)
        assert entries and all(e.label is not None for e in entries)
        for entry in entries:
            labels = np.asarray(nib.load(str(entry.label_path)).dataobj)
            assert set(np.unique(labels).tolist()) == {0, 1, 2}
            # every slice of every slab holds plenty of both tissues
            per_slice = [(labels[:, :, z] == c).sum() for z in range(labels.shape[2]) for c in (1, 2)]
            assert min(per_slice) > 500


def test_split_slabs_never_meet_in_world_space(demo_json):
    dataset = load_decathlon(demo_json)
    ranges = {split: [_world_z_range(e.image_path) for e in dataset.entries(split)]
              for split in ("training", "validation", "test")}
    for a, b in [("training", "test"), ("training", "validation"), ("validation", "test")]:
        for low_a, high_a in ranges[a]:
            for low_b, high_b in ranges[b]:
                assert high_a < low_b or high_b < low_a, (a, b, ranges)
    # at least one slice of gap (1 mm) between slabs of different splits
    assert min(abs(lo - hi) for lo, _ in ranges["training"] for _, hi in ranges["test"] + ranges["validation"]
               if lo > hi) > 1.0


def test_slab_affines_and_voxels_match_the_template(demo_json, template):
    t1, template_affine = template
    dataset = load_decathlon(demo_json)
    for split, slabs in demo.DEMO_SLABS.items():
        assert_slabs_are_template_crops(dataset.entries(split), slabs, t1, template_affine)


def test_tissue_labels_follow_threshold_and_larger_probability():
    gm = np.array([0, 200, 130, 200, 127], dtype=np.uint8)
    wm = np.array([0, 10, 140, 150, 127], dtype=np.uint8)
    assert demo.tissue_labels(gm, wm).tolist() == [0, 1, 2, 1, 0]


def test_writing_again_is_a_no_op_and_ensure_returns_the_json(demo_json):
    before = {p: p.stat().st_mtime_ns for p in demo_json.parent.rglob("*")}
    assert write_demo_dataset(str(demo_json.parent)) == str(demo_json)
    assert ensure_demo_dataset(demo_json.parent) == str(demo_json)
    assert {p: p.stat().st_mtime_ns for p in demo_json.parent.rglob("*")} == before


def test_ensure_keeps_a_user_dataset_and_foreign_folders_are_refused(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "dataset.json").write_text("{}")
    assert ensure_demo_dataset(user) == str((user / "dataset.json").resolve())
    assert (user / "dataset.json").read_text() == "{}"
    with pytest.raises(FileExistsError, match="not empty"):
        write_demo_dataset(str(user))


def test_ensure_rewrites_a_demo_of_an_older_version(tmp_path):
    """An old demo (another split) would silently give figures for the wrong split."""
    old = tmp_path / "demo"
    old.mkdir()
    (old / "dataset.json").write_text(json.dumps({"medsaga_demo": {"version": demo.DEMO_VERSION - 1}}))
    json_path = Path(ensure_demo_dataset(old))
    assert json.loads(json_path.read_text())["medsaga_demo"]["version"] == demo.DEMO_VERSION
    assert demo.is_complete_demo(old)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def crash(folder):
        (folder / "imagesTr").mkdir()
        (folder / "imagesTr" / "half.nii.gz").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_write_into", crash)
    with pytest.raises(KeyboardInterrupt):
        write_demo_dataset(str(tmp_path / "demo"))
    assert os.listdir(tmp_path) == []
