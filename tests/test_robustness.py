"""Bad input refused early and clearly: truncated files, non-finite intensities, mistyped folders,
the command line, file modes of outputs, unsafe pickles, atomic writes.

Each error must name the file (or key) and what was expected; nothing already on disk may change.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from data_synthetic import write_dataset
from medsaga_components.data import DatasetError, SliceDataset, SliceRef, read_image, validate_dataset


def _truncate(path, keep_fraction=0.5):
    """What an interrupted copy leaves: the first bytes of the file (its header intact)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def _with_nonfinite(path, nan=12, inf=1):
    image = nib.load(path)
    data = image.get_fdata().astype(np.float32)
    data[np.unravel_index(np.arange(nan), data.shape)] = np.nan
    data[np.unravel_index(np.arange(nan, nan + inf), data.shape)] = np.inf
    nib.save(nib.Nifti1Image(data, image.affine), str(path))


@pytest.mark.parametrize("which", ["images", "labels"])
def test_truncated_image_or_label_fails_validation_naming_the_file(tmp_path, which):
    dataset_json = write_dataset(tmp_path, n_training=2)
    broken = tmp_path / f"{which}Tr" / "case1.nii.gz"
    nib.load(broken)  # the header alone still reads: only reading the voxels finds the damage
    _truncate(broken)
    with pytest.raises(DatasetError, match="truncated or corrupt") as info:
        validate_dataset(dataset_json)
    assert str(broken) in str(info.value) and "case0" not in str(info.value)


def test_nonfinite_intensities_are_refused_with_file_and_count(tmp_path):
    dataset_json = write_dataset(tmp_path, n_training=2)
    image = tmp_path / "imagesTr" / "case1.nii.gz"
    _with_nonfinite(image, nan=12, inf=1)
    with pytest.raises(DatasetError) as info:
        validate_dataset(dataset_json)
    message = str(info.value)
    assert str(image) in message and "13 of" in message and "12 NaN, 1 infinite" in message
    assert "nonfinite_fill" in message  # the way to ask for replacement is named


def test_nonfinite_intensities_are_replaced_where_the_dataset_asks(tmp_path, caplog):
    dataset_json = write_dataset(tmp_path, n_training=2)
    image = tmp_path / "imagesTr" / "case1.nii.gz"
    _with_nonfinite(image, nan=12, inf=1)
    raw = json.loads(dataset_json.read_text())
    raw["nonfinite_fill"] = -5.0
    dataset_json.write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING):
        dataset = validate_dataset(dataset_json)
    assert any(str(image) in r.getMessage() and "13 of" in r.getMessage() for r in caplog.records)
    data, _ = read_image(image, dataset.nonfinite_fill)
    assert np.isfinite(data).all() and np.count_nonzero(data == -5.0) == 13
    # Training samples are finite too: the scaled slice holding the replaced voxels.
    sample = SliceDataset(dataset, [SliceRef("imagesTr/case1.nii.gz", "labelsTr/case1.nii.gz", axis=2, slice_index=0)],
                          image_size=32)[0]
    assert bool(sample["image"].isfinite().all())


def test_nonfinite_fill_must_be_a_number(tmp_path):
    dataset_json = write_dataset(tmp_path, n_training=1)
    raw = json.loads(dataset_json.read_text())
    raw["nonfinite_fill"] = "zero"
    dataset_json.write_text(json.dumps(raw))
    with pytest.raises(DatasetError, match="'nonfinite_fill' must be a finite number"):
        validate_dataset(dataset_json)


def test_a_mistyped_dataset_dir_is_an_error_and_gets_no_demo(tmp_path):
    from medsaga_components.engine import FewShotExperiment

    typo = tmp_path / "data" / "mni152_dmeo"
    with pytest.raises(DatasetError, match=r"mni152_dmeo does not exist.*expected .* dataset\.json") as info:
        FewShotExperiment(typo, tmp_path / "eval")
    assert "medsaga demo-data --out" in str(info.value)
    empty = tmp_path / "my_scans"
    empty.mkdir()
    with pytest.raises(DatasetError, match="my_scans is a folder without a dataset.json"):
        FewShotExperiment(empty, tmp_path / "eval")
    assert not typo.exists() and list(empty.iterdir()) == [] and not (tmp_path / "eval").exists()


# --- the command line: one sentence and a non-zero status, --debug for the traceback --------------

def _medsaga(*args):
    """The installed console script, as a user runs it."""
    exe = shutil.which("medsaga") or str(Path(sys.executable).parent / "medsaga")
    return subprocess.run([exe, *args], capture_output=True, text=True, env={**os.environ, "PAGER": "cat"},
                          stdin=subprocess.DEVNULL, timeout=300)


def test_cli_failure_is_one_sentence_and_a_nonzero_status(tmp_path):
    missing = tmp_path / "nowhere" / "dataset.json"
    done = _medsaga("fewshot", "--dataset_json", str(missing), "--shots", "3", "--out", str(tmp_path / "m.json"))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[0] == f"medsaga fewshot: error: dataset.json not found: {missing}"
    assert not (tmp_path / "m.json").exists()


def test_cli_debug_raises_the_exception_itself(tmp_path):
    from medsaga_components import cli

    with pytest.raises(DatasetError, match="dataset.json not found"):  # Python prints its traceback
        cli.main(["fewshot", "--dataset_json", str(tmp_path / "dataset.json"), "--shots", "3", "--debug"])


@pytest.mark.parametrize("command,parameter", [("fewshot", "--shots"), ("demo-data", "--overwrite")])
def test_cli_command_help_lists_its_parameters(command, parameter, capsys):
    from medsaga_components import cli

    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    text = "".join(capsys.readouterr())
    assert parameter in text and "unexpected keyword" not in text


def test_cli_missing_required_argument_names_it(tmp_path, capsys):
    from medsaga_components import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["fewshot", "--dataset_json", str(tmp_path / "dataset.json")])
    assert info.value.code == 2
    assert "no value for the required argument: shots" in capsys.readouterr().err


# --- outputs: normal permissions, errors naming the target ------------------------------------------

@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield 0o022
    os.umask(previous)


def test_outputs_written_atomically_get_the_umask_permissions(tmp_path, umask_022):
    from medsaga_components.io.atomic import write_json_atomic
    from medsaga_components.adapters.export import save_plain_model

    manifest = write_json_atomic(tmp_path / "out" / "manifest.json", {"k": 5})
    model = save_plain_model(torch.nn.Linear(2, 2), tmp_path / "models" / "model.pt")
    for path in (manifest, model):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path  # readable by a serving process
    os.umask(0o077)  # a user who asks for private files gets them
    private = write_json_atomic(tmp_path / "out" / "private.json", {})
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "private.json"]


def test_a_wrong_output_location_is_named_not_the_temporary_file(tmp_path):
    from medsaga_components.io.atomic import OutputWriteError, write_json_atomic

    (tmp_path / "report").write_text("a file where --out expects a folder")
    target = tmp_path / "report" / "evaluation.json"
    with pytest.raises(OutputWriteError, match=rf"cannot write {target}: {tmp_path / 'report'} is not a folder"):
        write_json_atomic(target, {})
    assert (tmp_path / "report").read_text() == "a file where --out expects a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_named(tmp_path):
    from medsaga_components.io.atomic import OutputWriteError, write_json_atomic

    folder = tmp_path / "ro"
    folder.mkdir()
    target = folder / "manifest.json"
    target.write_text("{}")
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputWriteError, match=rf"cannot write {target}: Permission denied") as info:
            write_json_atomic(target, {"k": 1})
        assert ".manifest.json." not in str(info.value)
    finally:
        folder.chmod(0o755)
    assert target.read_text() == "{}"


def test_the_demo_folder_is_readable_by_other_users(tmp_path, monkeypatch, umask_022):
    from medsaga_components.data import demo, write_demo_dataset

    monkeypatch.setattr(demo, "_write_into", lambda folder: (folder / "dataset.json").write_text("{}"))
    json_path = Path(write_demo_dataset(str(tmp_path / "data" / "mni152_demo")))
    assert stat.S_IMODE(json_path.parent.stat().st_mode) == 0o755  # not mkdtemp's 0700


# --- unsafe pickles: refused at every load site, naming the file, never advising to disable the check

class _RunsCode:
    """What a malicious checkpoint holds: unpickling it would create a folder (here, harmlessly)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _load_sites(tmp_path):
    """Every place the package reads a PyTorch file, as a user reaches it."""
    from medsaga_components.backbones import build_backbone
    from medsaga_components.engine import EvaluateOnTestVolumes, check_model_file
    from medsaga_components.inference.model import load_plain_model
    from medsaga_components.training.setup import prepare_training
    from medsaga_components.methods import get_method
    from medsaga_components.network import SamSegmenter

    def resume(path):
        (tmp_path / "checkpoints").mkdir(exist_ok=True)
        shutil.copy(path, tmp_path / "checkpoints" / "checkpoint_epoch=1.pt")
        trainer = _tiny_trainer()
        prepare_training(trainer, trainer.network, trainer.optimizer, None, tmp_path / "checkpoints", resume=True)

    return {
        "backbone checkpoint": lambda path: build_backbone("lite_medsam_tiny", checkpoint=path),
        "inference model check": check_model_file,
        "evaluation model": lambda path: load_plain_model(SamSegmenter("lite_medsam_tiny", 2, checkpoint=None,
                                                                       image_size=64), path),
        "test evaluation after training": lambda path: EvaluateOnTestVolumes(
            SamSegmenter("lite_medsam_tiny", 2, checkpoint=None, image_size=64), path, dataset=None,
            output_dir=tmp_path / "eval")(),
        "class embeddings": lambda path: get_method("ssam").build_prompt(2, 256, class_embeddings=str(path)),
        "resume": resume,
    }


def _tiny_trainer():
    from monai.engines import SupervisedTrainer

    net = torch.nn.Linear(1, 1)
    return SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[{"image": torch.zeros(1),
                             "label": torch.zeros(1)}], network=net, optimizer=torch.optim.SGD(net.parameters(), 0.1),
                             loss_function=torch.nn.MSELoss())


@pytest.mark.parametrize("site", ["backbone checkpoint", "inference model check", "evaluation model",
                                  "test evaluation after training", "class embeddings", "resume"])
def test_an_unsafe_pickle_is_refused_naming_the_file(tmp_path, site):
    from medsaga_components.io.checkpoints import UnsafeCheckpointError

    marker = tmp_path / "code_ran"
    evil = tmp_path / "model.pt"
    torch.save({"state_dict": _RunsCode(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError) as info:
        _load_sites(tmp_path)[site](evil)
    message = str(info.value)
    assert "refused as unsafe" in message and "posix.mkdir" in message
    assert str(evil) in message or str(tmp_path / "checkpoints" / "checkpoint_epoch=1.pt") in message
    assert "weights_only" not in message and info.value.__cause__ is None  # torch's advice is not passed on
    assert not marker.exists()


def test_a_corrupt_checkpoint_is_not_called_unsafe(tmp_path):
    from medsaga_components.io.checkpoints import CheckpointError, UnsafeCheckpointError, load_checkpoint

    good = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(3)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    for path in (truncated, tmp_path / "garbage.pt"):
        if path.name == "garbage.pt":
            path.write_bytes(b"not a checkpoint")
        with pytest.raises(CheckpointError, match=f"{path} could not be read as a PyTorch file") as info:
            load_checkpoint(path)
        assert not isinstance(info.value, UnsafeCheckpointError) and "weights_only" not in str(info.value)


# --- atomic writes: predictions of run inference, the benchmark's report -----------------------------

def _prediction(tmp_path):
    from monai.data import MetaTensor

    labels = torch.zeros(1, 6, 5, 4)
    labels[0, 2:4] = 1
    return {"pred": MetaTensor(labels, affine=torch.diag(torch.tensor([2.0, 1.0, 1.5, 1.0])),
                               meta={"filename_or_obj": str(tmp_path / "case7.nii.gz")})}


def test_run_inference_predictions_are_written_atomically(tmp_path, monkeypatch, umask_022):
    from monai.transforms import SaveImaged

    from medsaga_components.inference.writer import AtomicNibabelWriter, register_atomic_nifti_writer

    register_atomic_nifti_writer()  # what inference.json's initialize does

    def saver():
        return SaveImaged(keys="pred", output_dir=str(tmp_path / "out"), output_postfix="seg", output_dtype=np.uint8,
                          resample=False, separate_folder=False, print_log=False)

    target = tmp_path / "out" / "case7_seg.nii.gz"
    saver()(_prediction(tmp_path))
    assert isinstance(saver().saver.writers[0](), AtomicNibabelWriter)
    written = nib.load(target)
    np.testing.assert_array_equal(np.asarray(written.dataobj), _prediction(tmp_path)["pred"][0].numpy())
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    before = target.read_bytes()

    def interrupted(image, filename):  # the process stops halfway through the file
        Path(filename).write_bytes(b"\x1f\x8b partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        writer = AtomicNibabelWriter(output_dtype=np.uint8)
        writer.set_data_array(_prediction(tmp_path)["pred"], channel_dim=0)
        writer.write(target)
    assert target.read_bytes() == before  # the previous prediction, not half a new one
    assert sorted(p.name for p in target.parent.iterdir()) == ["case7_seg.nii.gz"]


def test_benchmark_report_is_written_atomically(tmp_path, monkeypatch):
    """How the report is written, not what it measures: the workers and the table are replaced
    (tests/test_benchmark.py runs the real ones)."""
    from medsaga_components import benchmark

    monkeypatch.setattr(benchmark, "reference_ratios", lambda results: {})
    result = {"method": "samed", "trainable_parameters": 1, "optimizer_state_bytes": 2, "peak_memory_bytes": 3,
              "median_step_seconds": 0.5}
    monkeypatch.setattr(benchmark, "run_worker_in_fresh_process", lambda name, *a, **k: {**result, "method": name})
    monkeypatch.setattr(benchmark, "render_markdown", lambda report: "| table |\n")
    written = []
    real = benchmark.write_text_atomic
    monkeypatch.setattr(benchmark, "write_text_atomic", lambda path, text: written.append(Path(path).name)
                        or real(path, text))
    benchmark.benchmark_command(methods="samed", out=str(tmp_path / "bench"), steps=1)
    assert written == ["benchmark.json", "benchmark.md"]
    assert json.loads((tmp_path / "bench" / "benchmark.json").read_text())["methods"]["samed"]["method"] == "samed"


# --- the whole list: every class of bad input stops a bundle's training before it starts ------------
#
# Each case runs the medsaga bundle's train.json as `monai.bundle run training` does (in-process,
# ConfigWorkflow), in a bundle folder holding a previous run's outputs. It must fail in
# `initialize`, before the trainer runs, with a message naming the file or key and what was
# expected, and leave every file of the dataset and the bundle folder as it was.

CASES = {
    "truncated image": (r"imagesTr/case1.nii.gz: voxel data cannot be read .* truncated or corrupt", {}),
    "truncated label": (r"labelsTr/case1.nii.gz: voxel data cannot be read .* truncated or corrupt", {}),
    "shape mismatch": (r"labelsTr/case1.nii.gz: label shape \(40, 32, 23\) differs from image .* expected the same "
                       r"grid", {}),
    "affine mismatch": (r"labelsTr/case1.nii.gz: label affine differs from image .* expected the same voxel-to-world",
                        {}),
    "4-D image": (r"imagesTr/case1.nii.gz: shape \(40, 32, 24, 2\), expected a single-channel 2-D or 3-D image", {}),
    "NaN intensities": (r"imagesTr/case1.nii.gz: 13 of 30720 voxels are not finite .* expected finite intensities",
                        {}),
    "undeclared label": (r"labelsTr/case1.nii.gz: label values \[7\] are not declared in 'labels'", {}),
    "empty dataset": (r"dataset.json: 'training' is empty, expected at least one labelled image", {}),
    "too many shots": (r"requested 500 few-shot slices, but only \d+ labelled slices", {"shots": 500}),
    "unknown backbone": (r"unknown backbone 'vit_x'", {"backbone": "vit_x"}),
    "unknown method": (r"unknown method 'medsagaa'; expected one of", {"method": "medsagaa"}),
    "unknown strategy": (r"strategy must be one of .* got 'sometimes'", {"fewshot_strategy": "sometimes"}),
    "checkpoint of another architecture": (r"other_architecture.pth does not fit the lite_medsam_tiny at 64 px architecture; missing keys",
                                           {"checkpoint": "{root}/other_architecture.pth"}),
    "unsafe pickle": (r"evil.pth is refused as unsafe", {"checkpoint": "{root}/evil.pth"}),
}


def _break_dataset(root, case):
    from data_synthetic import affine_with_spacing, save

    image, label = root / "imagesTr" / "case1.nii.gz", root / "labelsTr" / "case1.nii.gz"
    labels = np.asarray(nib.load(label).dataobj)
    if case.startswith("truncated"):
        _truncate(image if case == "truncated image" else label)
    elif case == "shape mismatch":
        save(labels[:, :, :-1], affine_with_spacing(), label)
    elif case == "affine mismatch":
        save(labels, affine_with_spacing(origin=(0.0, 0.0, 0.0)), label)
    elif case == "4-D image":
        data = nib.load(image).get_fdata().astype(np.float32)
        save(np.stack([data, data], axis=-1), affine_with_spacing(), image)
    elif case == "NaN intensities":
        _with_nonfinite(image)
    elif case == "undeclared label":
        labels = labels.copy()
        labels[0, 0, 0] = 7
        save(labels, affine_with_spacing(), label)
    elif case == "empty dataset":
        raw = json.loads((root / "dataset.json").read_text())
        raw["training"] = []
        (root / "dataset.json").write_text(json.dumps(raw))


def _chain(error):
    """The messages of ``error`` and of the errors it was raised from, as the traceback prints them."""
    messages = []
    while error is not None:
        messages.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(messages)


def _files(*folders):
    """Every file under ``folders`` -> its bytes' sha256 (what 'nothing changed' compares)."""
    import hashlib

    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.rglob("*"))
            if p.is_file()}


def _train_workflow(bundle_root, dataset_dir, **overrides):
    from monai.bundle import ConfigWorkflow

    from bundle_runs import REPO

    folder = REPO / "bundles" / "medsaga" / "configs"
    settings = {"bundle_root": str(bundle_root), "dataset_dir": str(dataset_dir), "backbone": "lite_medsam_tiny",
                "checkpoint": None, "image_size": 64, "epochs": 1, "steps_per_epoch": 1,
                "keep_freed_cpu_memory": False, **overrides}  # leave glibc's settings of the test process alone
    return ConfigWorkflow(config_file=str(folder / "train.json"), workflow_type="train", **settings)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_stops_training_before_it_starts_and_changes_nothing(tmp_path, case, one_torch_thread):
    from medsaga_components.backbones import build_backbone
    from medsaga_components.engine import FewShotExperiment

    pattern, overrides = CASES[case]
    dataset_dir = tmp_path / "data"
    write_dataset(dataset_dir, n_training=2)
    bundle = tmp_path / "bundle"
    # A previous run's outputs: its model and its few-shot manifest (the bundle's default selection).
    (bundle / "models").mkdir(parents=True)
    torch.save({"w": torch.ones(2)}, bundle / "models" / "model.pt")
    FewShotExperiment(dataset_dir, bundle / "eval", shots=5, strategy="total", spacing="even", seed=0, axis=2,
                      image_size=64, rotation_degrees=0)
    torch.save(build_backbone("vit_tiny", image_size=64, checkpoint=None).state_dict(),
               bundle / "other_architecture.pth")
    torch.save({"model": _RunsCode(tmp_path / "code_ran")}, bundle / "evil.pth")
    _break_dataset(dataset_dir, case)
    overrides = {k: v.format(root=bundle) if isinstance(v, str) else v for k, v in overrides.items()}
    before = _files(dataset_dir, bundle)

    workflow = _train_workflow(bundle, dataset_dir, **overrides)
    with pytest.raises(Exception) as info:
        workflow.initialize()  # builds everything and runs `initialize`; the trainer never runs
    message = _chain(info.value)  # MONAI wraps the error in "Failed to instantiate component ..."; both print
    assert re.search(pattern, message, flags=re.S), message
    assert _files(dataset_dir, bundle) == before
    assert not (bundle / "models" / "checkpoints").exists() and not (tmp_path / "code_ran").exists()


def test_a_misspelled_key_on_the_command_line_is_refused_before_anything_is_read(tmp_path):
    from bundle_runs import TINY_TRAINING, configs, run_bundle

    dataset_dir = tmp_path / "data"
    write_dataset(dataset_dir, n_training=2)
    before = _files(dataset_dir)
    done = run_bundle("training", configs("medsaga", "train"), "--bundle_root", str(tmp_path / "bundle"),
                      "--dataset_dir", str(dataset_dir), *TINY_TRAINING, "--shot", "3", check=False)
    assert done.returncode != 0
    assert "unknown config key --shot on the command line" in done.stderr and "did you mean --shots?" in done.stderr
    assert str(configs("medsaga", "train")) in done.stderr
    assert _files(dataset_dir) == before and not (tmp_path / "bundle").exists()


# --- downloaded SAM weights and untrusted bundles ------------------------------------------------------

def test_sam_weights_are_checked_against_the_hashes_every_bundle_publishes():
    """A downloaded ViT-B/L/H file is read only after its sha256 matches (tests/test_backbones.py
    checks that a mismatch is an error); the hashes checked are the ones the bundles list."""
    import yaml

    from bundle_runs import REPO
    from medsaga_components.backbones.sam_vit import VIT_SPECS

    checked = {Path(spec.url).name: spec.sha256 for spec in VIT_SPECS.values() if spec.url}  # vit_tiny: none
    for listing in sorted((REPO / "bundles").glob("*/large_files.yml")):
        entries = yaml.safe_load(listing.read_text())["large_files"]
        published = {Path(e["path"]).name: e["hash_val"] for e in entries if e["hash_type"] == "sha256"}
        assert published == checked, listing


def test_readme_says_bundle_configs_run_code_and_must_be_trusted():
    from bundle_runs import REPO

    readme = (REPO / "README.md").read_text()
    assert "Bundle configs can execute code (`$` expressions): run bundles from trusted sources only." in readme
