"""The bundles end to end, as users run them: properties, training, evaluation, inference,
resume, torchrun, metadata. Every bundle gets the core checks, and every folder of bundles/
MONAI's own checks (metadata schema, network in/out, torchrun); the run-mechanics checks that
are the same code for all (resume, bad overrides) run on medsaga."""

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from bundle_runs import REPO, TINY_TRAINING, configs, run_bundle
from medsaga_components import SamSegmenter
from medsaga_components.optimizers.galore import allow_galore_state_in_checkpoints
from medsaga_components.precision import native_bf16

pytestmark = pytest.mark.slow
BUNDLE = REPO / "bundles" / "medsaga"
ALL_BUNDLES = ("medsaga", "samed", "ssam", "mcp_medsam", "cheap_lunch")
PROMPT_OF = {"medsaga": "none", "samed": "none", "ssam": "class_tokens", "mcp_medsam": "mcp", "cheap_lunch": "class_points"}
# Every bundle folder: MONAI's own checks (verify_metadata, verify_net_in_out, torchrun) and
# MONAI Label's keys cover new bundles as soon as they exist.
DISCOVERED = tuple(sorted(p.parent.name for p in (REPO / "bundles").glob("*/configs")))
# Checked on a subset to keep CI short: the prompt-free bundles share one multi_gpu_train.json
# and training code (medsaga stands for samed and ssam); the prompted ones have their own loaders.
TORCHRUN_CHECKED = tuple(b for b in DISCOVERED if b not in ("samed", "ssam"))
SWITCH_CHECKED = ("medsaga", "mcp_medsam")
# float32 by default (bf16 lowered test Dice on the small-structure demo); `--bf16 auto` is on where
# this CPU has native bf16, which tests/test_precision.py checks against /proc/cpuinfo
FLOAT32_DEFAULT = "image encoder precision: float32 (bf16=False"
AUTO_PRECISION = f"image encoder precision: {'bf16 autocast' if native_bf16('cpu') else 'float32'} (bf16=auto"


@pytest.fixture(scope="module", params=ALL_BUNDLES)
def trained(request, tmp_path_factory, demo_dir):
    """One tiny training run per bundle, shared by the tests that read its outputs."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    shutil.copytree(REPO / "bundles" / name / "configs", root / "configs")
    done = run_bundle("training", configs(name, "train"), "--bundle_root", str(root),
                      "--dataset_dir", str(demo_dir), *TINY_TRAINING)
    return name, root, done.stdout + done.stderr


def _plain_network(bundle):
    return SamSegmenter("lite_medsam_tiny", 2, checkpoint=None, image_size=64, prompt=PROMPT_OF[bundle])


@pytest.mark.parametrize("bundle", ALL_BUNDLES)
@pytest.mark.parametrize("config,workflow_type", [("train", "train"), ("inference", "infer")])
def test_config_properties(bundle, config, workflow_type, tmp_path, demo_dir):
    folder = REPO / "bundles" / bundle / "configs"
    workflow = ConfigWorkflow(config_file=str(folder / f"{config}.json"), workflow_type=workflow_type,
                              meta_file=str(folder / "metadata.json"), logging_file=str(folder / "logging.conf"),
                              bundle_root=str(tmp_path), dataset_dir=str(demo_dir), backbone="lite_medsam_tiny",
                              checkpoint=None, image_size=64)
    if workflow_type == "infer":
        (tmp_path / "models").mkdir()
        torch.save(_plain_network(bundle).state_dict(), tmp_path / "models" / "model.pt")
    workflow.initialize()  # MONAI 1.6 reads the properties from the initialized workflow
    assert workflow.check_properties() == []


def test_training_saves_a_plain_model_and_a_test_report(trained):
    bundle, root, log = trained
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    _plain_network(bundle).load_state_dict(state, strict=True)
    report = json.loads((root / "eval" / "evaluation.json").read_text())
    classes = [c for volume in report["volumes"] for c in volume["classes"]]
    assert {c["name"] for c in classes} == {"grey matter", "white matter"}
    assert len(report["volumes"]) == 2 and all(0.0 <= c["dice"] <= 1.0 for c in classes)
    assert list((root / "eval" / "overlays").glob("*.png"))
    manifest = json.loads((root / "eval" / "fewshot_manifest.json").read_text())
    assert manifest["k"] == 5
    assert "val_mean_dice" in log


def test_evaluating_rewrites_the_report_from_model_pt(trained, demo_dir):
    bundle, root, _ = trained
    report = root / "eval" / "evaluation.json"
    at_training = json.loads(report.read_text())
    predictions = sorted((root / "eval" / "predictions").glob("*.nii.gz"))
    predicted_at_training = [np.asarray(nib.load(p).dataobj) for p in predictions]
    report.unlink()
    run_bundle("evaluating", configs(bundle, "train", "evaluate"), "--bundle_root", str(root),
               "--dataset_dir", str(demo_dir), *TINY_TRAINING)
    # The same model on the same slices gives the same label maps and figures as the
    # evaluation after training (the network in eval mode both times).
    assert predictions
    for path, before in zip(predictions, predicted_at_training):
        np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), before, err_msg=str(path))
    rewritten = json.loads(report.read_text())
    assert [v["mean_dice"] for v in rewritten["volumes"]] == [v["mean_dice"] for v in at_training["volumes"]]


def test_inference_writes_label_maps_with_the_input_geometry(trained, demo_dir):
    bundle, root, _ = trained
    out = root / "eval" / "inference"
    done = run_bundle("inference", configs(bundle, "inference"), "--bundle_root", str(root),
                      "--dataset_dir", str(demo_dir), "--backbone", "lite_medsam_tiny", "--image_size", "64",
                      "--bf16", "auto")
    assert AUTO_PRECISION in done.stdout + done.stderr  # the switch reaches inference too
    outputs = sorted(out.glob("*_seg.nii.gz"))
    inputs = json.loads((demo_dir / "dataset.json").read_text())["test"]
    assert len(outputs) == len(inputs)
    for entry, written in zip(sorted(inputs, key=lambda e: e["image"]), outputs):
        source = nib.load(demo_dir / entry["image"])
        seg = nib.load(written)
        assert seg.shape == source.shape
        np.testing.assert_allclose(seg.affine, source.affine, atol=1e-5)
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2}


MEMORY_MODE_ON = "memory-efficient training: activation_checkpointing, layerwise_steps, frozen_without_grad"


def test_memory_efficient_mode_and_float32_are_every_bundles_defaults_and_switches(trained, tmp_path, demo_dir):
    bundle, _, log = trained
    assert MEMORY_MODE_ON in log and FLOAT32_DEFAULT in log
    if bundle not in SWITCH_CHECKED:
        return  # the switches are the same train.json keys and code in every bundle
    shutil.copytree(REPO / "bundles" / bundle / "configs", tmp_path / "configs")
    done = run_bundle("training", configs(bundle, "train"), "--bundle_root", str(tmp_path), "--dataset_dir",
                      str(demo_dir), *TINY_TRAINING, "--epochs", "1", "--memory_efficient", "False", "--bf16", "auto")
    flipped = done.stdout + done.stderr
    assert "memory-efficient training: off (plain mode)" in flipped and MEMORY_MODE_ON not in flipped
    assert AUTO_PRECISION in flipped
    assert (tmp_path / "models" / "model.pt").is_file()


def test_resume_continues_where_training_stopped(tmp_path, demo_dir):
    shutil.copytree(BUNDLE / "configs", tmp_path / "configs")
    common = ["--bundle_root", str(tmp_path), "--dataset_dir", str(demo_dir), *TINY_TRAINING]
    run_bundle("training", configs("medsaga", "train"), *common, "--epochs", "1")
    done = run_bundle("training", configs("medsaga", "train"), *common, "--epochs", "2", "--resume", "True")
    log = done.stdout + done.stderr
    assert "resuming from" in log
    assert "Epoch: 1/2" not in log and "Epoch: 2/2" in log
    allow_galore_state_in_checkpoints()  # the checkpoint holds GaLore's optimiser state
    final = torch.load(tmp_path / "models" / "checkpoints" / "final.pt", weights_only=True)
    assert final["trainer"]["max_epochs"] == 2 and final["trainer"]["iteration"] == 4  # 2 epochs x 2 steps


def test_bad_overrides_fail_with_the_key_named(tmp_path, demo_dir):
    shutil.copytree(BUNDLE / "configs", tmp_path / "configs")
    done = run_bundle("training", configs("medsaga", "train"), "--bundle_root", str(tmp_path),
                      "--dataset_dir", str(demo_dir), *TINY_TRAINING, "--shots", "0", check=False)
    assert done.returncode != 0 and "shots must be positive" in done.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "x"}, "modality": {"0": "MRI"},
                                                     "training": [{"image": "missing.nii.gz", "label": "m.nii.gz"}]}))
    done = run_bundle("training", configs("medsaga", "train"), "--bundle_root", str(tmp_path),
                      "--dataset_dir", str(broken), *TINY_TRAINING, check=False)
    assert done.returncode != 0 and "missing.nii.gz" in done.stderr


@pytest.mark.parametrize("bundle", TORCHRUN_CHECKED)
def test_torchrun_two_processes(bundle, tmp_path, demo_dir):
    """Real distributed training: two CPU processes with the gloo backend."""
    shutil.copytree(REPO / "bundles" / bundle / "configs", tmp_path / "configs")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533"]
    run_bundle("training", configs(bundle, "train", "multi_gpu_train"), "--bundle_root", str(tmp_path),
               "--dataset_dir", str(demo_dir), *TINY_TRAINING, launcher=launcher)
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state), "the exported model must be the unwrapped network"
    assert (tmp_path / "eval" / "evaluation.json").is_file()


@pytest.mark.parametrize("bundle", DISCOVERED)
def test_metadata_and_network_io_verify(bundle):
    folder = REPO / "bundles" / bundle
    meta = str(folder / "configs" / "metadata.json")
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", meta,
                           "--filepath", str(REPO / "bundles" / "meta_schema.json")], capture_output=True, text=True)
    assert done.returncode == 0 and "metadata is verified with no error" in (done.stdout + done.stderr), done.stderr
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file", meta,
                           "--config_file", str(folder / "configs" / "inference.json"), "--bundle_root", str(folder),
                           "--backbone", "lite_medsam_tiny"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and "data shape of network is verified with no error" in (done.stdout + done.stderr), \
        done.stderr[-3000:]


@pytest.mark.parametrize("bundle", DISCOVERED)
def test_keys_monai_labels_bundle_tasks_read(bundle):
    """What MONAI Label's BundleInferTask/BundleTrainTask read and override (monailabel 0.8.5
    tasks/infer/bundle.py, tasks/train/bundle.py), checked with MONAI's ConfigParser."""
    from monai.bundle import ConfigParser

    folder = REPO / "bundles" / bundle / "configs"
    meta = json.loads((folder / "metadata.json").read_text())["network_data_format"]
    assert next(iter(meta["inputs"])) == "image" and next(iter(meta["outputs"])) == "pred"
    pred = meta["outputs"]["pred"]
    assert pred["channel_def"]["0"] == "background" and len(pred["channel_def"]) == pred["num_channels"]
    assert len(pred["spatial_shape"]) == 2
    inference = ConfigParser()
    inference.read_config(str(folder / "inference.json"))
    for key in ("device", "bundle_root", "network_def", "preprocessing", "postprocessing", "inferer"):
        assert key in inference, key
    # Overridable training keys (MONAI Label sets them before `run`; tests/test_datalist.py trains with them).
    datalist = [{"image": "/i.nii.gz", "label": "/l.nii.gz"}]
    for key, value in (("bundle_root", "/b"), ("device", "cpu"), ("train#trainer#max_epochs", 3), ("train#handlers", []),
                       ("train#dataset#data", datalist), ("validate#dataset#data", datalist)):
        train = ConfigParser()
        train.read_config(str(folder / "train.json"))
        train[key] = value
        assert train[key] == value
    assert "network" in train


@pytest.mark.parametrize("bundle", ALL_BUNDLES)
def test_the_starting_model_is_validated_only_when_asked(bundle):
    config = json.loads((REPO / "bundles" / bundle / "configs" / "train.json").read_text())
    assert config["validate_before_training"] is False
    handlers = config["train"]["handlers"] if "handlers" in config["train"] else config["train"]["trainer"]["train_handlers"]
    validation = [h for h in handlers if isinstance(h, dict) and h.get("_target_") == "ValidationHandler"]
    assert [h["exec_at_start"] for h in validation] == ["@validate_before_training"]

