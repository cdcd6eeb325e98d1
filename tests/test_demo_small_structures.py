"""The small-structure demo (Colin27 + AAL from Debian's mricron-data): classes, split, geometry, selection.

Real data: scripts/setup_env.sh installs mricron-data (as root, with apt-get). Where its files
are missing these tests fail, saying how to install them; they are not skipped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from demo_checks import assert_slabs_are_template_crops

from medsaga_components.data import demo, demo_small_structures, ensure_demo_dataset, load_decathlon, validate_dataset
from medsaga_components.data import DatasetError, write_demo_dataset

CLASS_NAMES = ("background", "amygdala", "pallidum", "insula", "parahippocampal gyrus")
SPLITS = ("training", "validation", "test")


@pytest.fixture(scope="module")
def mricron_dir() -> Path:
    try:
        return demo_small_structures.mricron_template_dir()
    except FileNotFoundError as exc:
        message = str(exc)
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="module")
def colin27(mricron_dir):
    """(T1 uint8 [181, 217, 181], AAL ids [181, 217, 181], affine [4, 4]) as the package ships them."""
    t1 = nib.load(str(mricron_dir / "ch2.nii.gz"))
    atlas = nib.load(str(mricron_dir / "aal.nii.gz"))
    return np.asarray(t1.dataobj), np.asarray(atlas.dataobj), t1.affine


@pytest.fixture(scope="module")
def small_json(mricron_dir, tmp_path_factory) -> Path:
    return Path(write_demo_dataset(str(tmp_path_factory.mktemp("demo") / "aal"), task="small_structures"))


def _labels(entry) -> np.ndarray:
    return np.asarray(nib.load(str(entry.label_path)).dataobj)


def _world_z_range(path: Path) -> tuple[float, float]:
    image = nib.load(str(path))
    corners = image.affine @ np.array([[0, 0, 0, 1], [0, 0, image.shape[2] - 1, 1]]).T
    return float(corners[2].min()), float(corners[2].max())


def test_package_files_have_the_expected_grid_and_aal_ids(mricron_dir, colin27):
    t1, atlas, affine = colin27
    assert t1.shape == atlas.shape == demo_small_structures.COLIN27_SHAPE
    assert t1.dtype == np.uint8
    assert np.allclose(np.abs(np.diag(affine)[:3]), 1.0)  # 1 mm voxels
    names = demo_small_structures.read_aal_names(mricron_dir / "aal.nii.txt")
    assert len(names) == 116 and set(np.unique(atlas).tolist()) == {0, *range(1, 117)}
    assert {i: names[i] for i in (29, 30, 39, 40, 41, 42, 75, 76)} == {
        29: "Insula_L", 30: "Insula_R", 39: "ParaHippocampal_L", 40: "ParaHippocampal_R",
        41: "Amygdala_L", 42: "Amygdala_R", 75: "Pallidum_L", 76: "Pallidum_R"}
    demo_small_structures.check_aal_ids(names)


def test_changed_aal_ids_are_refused():
    names = {29: "Insula_L", 30: "Insula_R", 39: "ParaHippocampal_L", 40: "ParaHippocampal_R",
             41: "Amygdala_L", 42: "Amygdala_R", 75: "Putamen_L", 76: "Pallidum_R"}
    with pytest.raises(ValueError, match="id 75: expected 'Pallidum_L', found 'Putamen_L'"):
        demo_small_structures.check_aal_ids(names)


def test_left_and_right_regions_merge_into_four_classes():
    atlas = np.array([0, 41, 42, 75, 76, 29, 30, 39, 40, 37, 116], dtype=np.uint8)
    assert demo_small_structures.merge_aal_regions(atlas).tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 0, 0]


def test_small_structures_is_a_valid_four_class_dataset(small_json):
    dataset = validate_dataset(small_json)
    assert dataset.class_names == CLASS_NAMES
    assert dataset.modality == "MRI"
    raw = json.loads(small_json.read_text())
    assert raw["medsaga_demo"]["task"] == "small_structures"
    assert "BSD-3-clause" in raw["licence"] and "Chris Rorden" in raw["licence"]
    assert "AAL" in raw["licence"] and "GNU General Public Licence" in raw["licence"]
    for split in SPLITS:
        assert dataset.entries(split) and all(e.label is not None for e in dataset.entries(split))


def test_every_class_is_in_the_few_shot_candidates_and_in_the_test(small_json):
    dataset = load_decathlon(small_json)
    present = {split: set().union(*(np.unique(_labels(e)).tolist() for e in dataset.entries(split)))
               for split in SPLITS}
    assert present["training"] == present["validation"] == present["test"] == {0, 1, 2, 3, 4}
    # the test is one volume holding every class, so no test Dice is a "both empty" 1.0
    (test_entry,) = dataset.entries("test")
    assert set(np.unique(_labels(test_entry)).tolist()) == {0, 1, 2, 3, 4}
    # the recorded voxel counts are what the files hold, and every class has at least 3 slices
    # of >= 80 voxels among the few-shot candidates
    recorded = json.loads(small_json.read_text())["medsaga_demo"]["class_voxels"]
    for split in SPLITS:
        labels = [_labels(e) for e in dataset.entries(split)]
        for index, name in enumerate(CLASS_NAMES[1:], start=1):
            assert recorded[split][name] == sum(int((lab == index).sum()) for lab in labels)
    training = [_labels(e) for e in dataset.entries("training")]
    for index in range(1, 5):
        per_slice = [int((lab[:, :, z] == index).sum()) for lab in training for z in range(lab.shape[2])]
        assert sum(count >= 80 for count in per_slice) >= 3, (CLASS_NAMES[index], per_slice)


def test_split_slabs_are_at_least_two_slices_apart_in_world_space(small_json):
    dataset = load_decathlon(small_json)
    ranges = {split: [_world_z_range(e.image_path) for e in dataset.entries(split)] for split in SPLITS}
    for a, b in [("training", "test"), ("training", "validation"), ("validation", "test")]:
        for low_a, high_a in ranges[a]:
            for low_b, high_b in ranges[b]:
                # 1 mm slices: a gap of two slices puts the nearest slice centres 3 mm apart
                assert low_b - high_a >= 3.0 or low_a - high_b >= 3.0, (a, b, ranges)


def test_slab_affines_and_voxels_match_colin27_and_aal(small_json, colin27):
    t1, atlas, template_affine = colin27
    merged = demo_small_structures.merge_aal_regions(atlas)
    dataset = load_decathlon(small_json)
    for split, slabs in demo_small_structures.SLABS.items():
        assert len(dataset.entries(split)) == len(slabs)
        assert_slabs_are_template_crops(dataset.entries(split), slabs, t1, template_affine, merged)


def test_missing_package_says_how_to_install_it(tmp_path, monkeypatch):
    (tmp_path / "ch2.nii.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as info:
        demo_small_structures.mricron_template_dir(tmp_path)
    message = str(info.value)
    assert "apt-get install -y mricron-data" in message and "bookworm" in message
    assert "aal.nii.gz" in message and "aal.nii.txt" in message and "'ch2.nii.gz'" not in message
    # the same error reaches `medsaga demo-data --task small_structures`, and nothing is left behind
    monkeypatch.setattr(demo_small_structures, "MRICRON_TEMPLATE_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="apt-get install -y mricron-data"):
        write_demo_dataset(str(tmp_path / "out"), task="small_structures")
    assert not (tmp_path / "out").exists()


def test_unknown_task_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown demo task 'brats'.*small_structures"):
        write_demo_dataset(str(tmp_path / "out"), task="brats")


def test_ensure_prepares_the_task_of_the_default_folder_name(tmp_path, monkeypatch):
    written = []

    def fake_writer(task):
        def write(folder):
            written.append(task)
            (folder / "dataset.json").write_text(json.dumps({"medsaga_demo": {"task": task, "version": 1}}))
        return write

    monkeypatch.setattr(demo, "_write_into", fake_writer("mni152"))
    monkeypatch.setattr(demo, "_write_small_structures_into", fake_writer("small_structures"))
    ensure_demo_dataset(tmp_path / "data" / "aal_small_structures")
    ensure_demo_dataset(tmp_path / "data" / "mni152_demo")
    with pytest.raises(DatasetError, match="anything_else does not exist.*medsaga demo-data --out"):
        ensure_demo_dataset(tmp_path / "data" / "anything_else")  # a mistyped dataset_dir gets no demo
    assert written == ["small_structures", "mni152"]
    assert not (tmp_path / "data" / "anything_else").exists()
    assert demo.demo_task_for_folder("bundles/medsaga/data/aal_small_structures") == "small_structures"


def test_ensure_keeps_the_current_small_structures_demo_and_writing_again_is_a_no_op(small_json, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in small_json.parent.rglob("*")}
    assert write_demo_dataset(str(small_json.parent), task="small_structures") == str(small_json)
    assert ensure_demo_dataset(small_json.parent) == str(small_json)
    assert {p: p.stat().st_mtime_ns for p in small_json.parent.rglob("*")} == before
    # a complete small-structure demo is not an MNI152 demo: writing the other task there is refused
    with pytest.raises(FileExistsError, match="mni152"):
        write_demo_dataset(str(small_json.parent))


def test_ensure_rewrites_an_older_small_structures_demo_as_the_same_task(mricron_dir, tmp_path):
    old = tmp_path / "data" / "some_name"
    old.mkdir(parents=True)
    (old / "dataset.json").write_text(json.dumps({"medsaga_demo": {"task": "small_structures", "version": 0}}))
    json_path = Path(ensure_demo_dataset(old))
    marker = json.loads(json_path.read_text())["medsaga_demo"]
    assert (marker["task"], marker["version"]) == ("small_structures", demo_small_structures.VERSION)
    assert demo.is_complete_demo(old, "small_structures") and not demo.is_complete_demo(old)


def test_cli_demo_data_writes_the_small_structures_task(small_json, tmp_path, monkeypatch, capsys):
    from medsaga_components import cli

    out = tmp_path / "cli_demo"
    monkeypatch.setattr(sys, "argv", ["medsaga", "demo-data", "--task", "small_structures", "--out", str(out)])
    cli.main()
    assert capsys.readouterr().out.strip() == str(out.resolve() / "dataset.json")
    assert json.loads((out / "dataset.json").read_text())["medsaga_demo"]["task"] == "small_structures"
