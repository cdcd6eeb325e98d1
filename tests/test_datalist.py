"""Training from MONAI datalists: ``train#dataset#data`` / ``validate#dataset#data``, the keys
MONAI Label's ``BundleTrainTask`` overrides (monailabel 0.8.5 tasks/train/bundle.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bundle_runs import REPO
from medsaga_components.data import DatasetError
from medsaga_components.engine import FewShotExperiment

BUNDLES = ("medsaga", "samed", "ssam", "mcp_medsam", "cheap_lunch")


def volumes(demo: Path, split: str) -> list[dict]:
    listed = json.loads((demo / "dataset.json").read_text())[split]
    return [{"image": str(demo / d["image"]), "label": str(demo / d["label"])} for d in listed]


def test_datalist_volumes_replace_the_datasets_images(demo_dir, tmp_path):
    # Train on the demo's test volumes, validate on one validation volume: the few-shot slices
    # and validation come from the lists, the classes from demo_dir's dataset.json.
    train, validation = volumes(demo_dir, "test"), volumes(demo_dir, "validation")[:1]
    experiment = FewShotExperiment(demo_dir, tmp_path, shots=3, train_data=train, validation_data=validation)
    assert Path(experiment.dataset_json) == tmp_path / "datalist" / "dataset.json"
    assert experiment.class_names == ("grey matter", "white matter")
    assert {ref.volume for ref in experiment.train_dataset.slices} <= {d["image"] for d in train}
    assert {ref.volume for ref in experiment.val_dataset.slices} == {validation[0]["image"]}
    assert len(experiment.test_dataset) == 0  # declared validation, no test: the test evaluation is skipped


def test_datalist_without_validation_holds_slices_out_of_the_training_volumes(demo_dir, tmp_path):
    experiment = FewShotExperiment(demo_dir, tmp_path, shots=3, train_data=volumes(demo_dir, "training"),
                                   validation_data=[])
    assert experiment.manifest.holdout == "slices"
    few_shot = {(r.volume, r.slice_index) for r in experiment.train_dataset.slices}
    held_out = {(r.volume, r.slice_index) for r in (*experiment.val_dataset.slices, *experiment.test_dataset.slices)}
    assert len(experiment.val_dataset) and len(experiment.test_dataset) and not few_shot & held_out


@pytest.mark.parametrize("train_data, validation_data, message", [
    ([{"image": "a.nii.gz"}], None, r"train#dataset#data\[0\] must be an object with 'image' and 'label'"),
    ("a.nii.gz", None, "train#dataset#data must be a list"),
    ([], None, "train#dataset#data is empty"),
    (None, [{"image": "a.nii.gz", "label": "b.nii.gz"}], "train#dataset#data is not"),
])
def test_a_bad_datalist_is_refused_naming_the_key(demo_dir, tmp_path, train_data, validation_data, message):
    with pytest.raises((DatasetError, ValueError), match=message):
        FewShotExperiment(demo_dir, tmp_path, train_data=train_data, validation_data=validation_data)
    assert not (tmp_path / "datalist").exists() or train_data is None


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_trains_from_datalists_the_way_monai_labels_bundle_trainer_calls_it(bundle, demo_dir, tmp_path):
    """``monai.bundle.run(run_id="run", ..., **overrides)`` with the overrides BundleTrainTask
    sets (bundle_root, train#trainer#max_epochs, train#dataset#data, validate#dataset#data,
    device, train#handlers), in a fresh process, on the tiny random backbone."""
    root = tmp_path / bundle
    (root / "configs").mkdir(parents=True)
    for f in (REPO / "bundles" / bundle / "configs").glob("*"):
        (root / "configs" / f.name).write_bytes(f.read_bytes())
    (root / "data").mkdir()
    (root / "data" / "mni152_demo").symlink_to(demo_dir)  # dataset_dir's default: it declares the classes
    train, validation = volumes(demo_dir, "test"), volumes(demo_dir, "validation")[:1]
    script = textwrap.dedent(f"""
        import json, torch, monai
        from monai.bundle import ConfigParser
        config = ConfigParser()
        config.read_config({str(root / 'configs' / 'train.json')!r})
        monai.bundle.run(run_id="run", meta_file={str(root / 'configs' / 'metadata.json')!r},
                         config_file={str(root / 'configs' / 'train.json')!r}, **{{
            "bundle_root": {str(root)!r}, "train#trainer#max_epochs": 2, "device": torch.device("cpu"),
            "train#dataset#data": json.loads({json.dumps(train)!r}),
            "validate#dataset#data": json.loads({json.dumps(validation)!r}),
            "train#handlers": config.get("train#handlers"),
            "backbone": "lite_medsam_tiny", "checkpoint": None, "image_size": 64, "epochs": 2,
            "steps_per_epoch": 2, "batch_size": 2, "val_interval": 1}})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-5000:]
    manifest = json.loads((root / "eval" / "fewshot_manifest.json").read_text())
    assert manifest["dataset_json"] == str(root / "eval" / "datalist" / "dataset.json")
    assert {s["volume"] for s in manifest["slices"]} <= {d["image"] for d in train}
    assert [v["volume"] for v in manifest["validation"]] == [validation[0]["image"]]
    assert (root / "models" / "model.pt").is_file()
    assert "test evaluation skipped" in done.stderr + done.stdout
