"""Interrupted training loses nothing: a bundle run killed with SIGKILL after its first checkpoint
and restarted with the same command plus ``--resume True`` ends where an uninterrupted run ends.

The kill test runs real bundle processes (tiny settings of tests/bundle_runs.py); the best-metric
test is in-process and fast.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, from_engine
from monai.transforms import AsDiscreted

from bundle_runs import REPO, TINY_TRAINING, configs, run_bundle
from medsaga_components.engine import SaveBestPlainModel
from medsaga_components.training.setup import BestValidationMetric
from medsaga_components.optimizers.galore import allow_galore_state_in_checkpoints

EPOCHS = 4  # the kill lands in epoch 2 of 4: well before the end, however fast the machine


def _bundle_copy(root):
    shutil.copytree(REPO / "bundles" / "medsaga" / "configs", root / "configs")
    return root


def _command(root, demo_dir, *extra):
    # patience 0: train all EPOCHS, so that the kill always falls inside training (the tiny random
    # network's validation Dice does not improve, and patience would stop it early).
    return ["--bundle_root", str(root), "--dataset_dir", str(demo_dir), *TINY_TRAINING, "--epochs", str(EPOCHS),
            "--patience", "0", *extra]


def _load(path):
    allow_galore_state_in_checkpoints()  # the medsaga bundle's optimiser state holds GaLore projectors
    return torch.load(path, map_location="cpu", weights_only=True)


def _kill_after_first_checkpoint(root, demo_dir):
    """Start a training run, SIGKILL it as soon as its first epoch checkpoint exists."""
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
               configs("medsaga", "train"), *_command(root, demo_dir)]
    checkpoints = root / "models" / "checkpoints"
    with open(root / "killed_run.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 600
        while not list(checkpoints.glob("*epoch=*.pt")):
            assert process.poll() is None, (root / "killed_run.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (checkpoints / "final.pt").exists(), "the run ended before the kill: nothing was interrupted"


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, demo_dir):
    whole = _bundle_copy(tmp_path / "whole")
    run_bundle("training", configs("medsaga", "train"), *_command(whole, demo_dir))

    killed = _bundle_copy(tmp_path / "killed")
    _kill_after_first_checkpoint(killed, demo_dir)
    (saved,) = list((killed / "models" / "checkpoints").glob("*epoch=*.pt"))
    at_kill = _load(saved)
    epoch_at_kill = at_kill["trainer"]["iteration"] // at_kill["trainer"]["epoch_length"]
    assert 1 <= epoch_at_kill < EPOCHS
    best_at_kill = at_kill["validation"]["best_metric"]
    model_at_kill = _load(killed / "models" / "model.pt")
    manifest_at_kill = (killed / "eval" / "fewshot_manifest.json").read_text()

    done = run_bundle("training", configs("medsaga", "train"), *_command(killed, demo_dir, "--resume", "True"))
    log = done.stdout + done.stderr
    assert f"resuming from {saved} at epoch {epoch_at_kill}" in log
    assert f"Epoch: {epoch_at_kill}/{EPOCHS}" not in log and f"Epoch: {EPOCHS}/{EPOCHS}" in log

    # The same few-shot slices before and after the restart, and the same as the uninterrupted run's.
    manifest = (killed / "eval" / "fewshot_manifest.json").read_text()
    assert manifest == manifest_at_kill == (whole / "eval" / "fewshot_manifest.json").read_text()

    final, reference = _load(killed / "models" / "checkpoints" / "final.pt"), \
        _load(whole / "models" / "checkpoints" / "final.pt")
    assert final["trainer"]["iteration"] == reference["trainer"]["iteration"] == EPOCHS * 2
    # model.pt is never worse than before the kill: the best validation metric only rose.
    assert final["validation"]["best_metric"] >= best_at_kill
    if final["validation"]["best_metric_epoch"] == at_kill["validation"]["best_metric_epoch"]:
        for key, value in _load(killed / "models" / "model.pt").items():
            torch.testing.assert_close(value, model_at_kill[key], rtol=0, atol=0)
    assert final["validation"] == pytest.approx(reference["validation"])
    # The run is deterministic: the resumed run ends with the uninterrupted run's weights.
    for key, value in final["network"].items():
        torch.testing.assert_close(value, reference["network"][key], rtol=1e-5, atol=1e-6, msg=key)
    best, best_reference = _load(killed / "models" / "model.pt"), _load(whole / "models" / "model.pt")
    for key, value in best.items():
        torch.testing.assert_close(value, best_reference[key], rtol=1e-5, atol=1e-6, msg=key)
    assert json.loads((killed / "eval" / "evaluation.json").read_text())["mean_dice"] == pytest.approx(
        json.loads((whole / "eval" / "evaluation.json").read_text())["mean_dice"], abs=1e-6)


class _ConstantLogits(torch.nn.Module):
    """Predicts class 1 everywhere: its validation Dice is fixed by the labels."""

    def forward(self, images):
        logits = torch.zeros(images.shape[0], 2, *images.shape[2:])
        logits[:, 1] = 1.0
        return logits


def _evaluator(model_path):
    label = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    label[..., :4, :] = 1  # half the image: Dice 2/3 for the all-foreground prediction
    data = [{"image": torch.rand(1, 1, 8, 8), "label": label}]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=data, network=_ConstantLogits(),
        postprocessing=AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=2),
        key_val_metric={"val_mean_dice": MeanDice(include_background=False,
                                                  output_transform=from_engine(["pred", "label"]))})
    SaveBestPlainModel(torch.nn.Linear(1, 1), model_path).attach(evaluator)
    return evaluator


def test_a_restored_best_metric_keeps_a_better_model_pt(tmp_path):
    """What resume relies on: with the checkpoint's best metric restored, a worse validation
    leaves model.pt alone; an evaluator that starts over (the old behaviour) overwrites it."""
    restored = _evaluator(tmp_path / "restored" / "model.pt")
    BestValidationMetric(restored).load_state_dict({"best_metric": 0.9, "best_metric_epoch": 3})
    restored.run(4)
    assert restored.state.metrics["val_mean_dice"] == pytest.approx(2 / 3)
    assert not (tmp_path / "restored" / "model.pt").exists()
    assert BestValidationMetric(restored).state_dict() == {"best_metric": 0.9, "best_metric_epoch": 3}

    fresh = _evaluator(tmp_path / "fresh" / "model.pt")
    fresh.run(4)
    assert (tmp_path / "fresh" / "model.pt").exists()  # a worse model would have replaced the better one


def test_resume_refuses_other_few_shot_slices(tmp_path):
    """A restart whose settings select other slices would silently train on another task."""
    from data_synthetic import write_dataset
    from medsaga_components.io.checkpoints import CheckpointError
    from medsaga_components.data import SliceDataset, SliceRef
    from medsaga_components.training.setup import FewShotSlices

    dataset_json = write_dataset(tmp_path, n_training=1)

    def slices(*indices):
        return SliceDataset(dataset_json, [SliceRef("imagesTr/case0.nii.gz", "labelsTr/case0.nii.gz", 2, i)
                                           for i in indices], image_size=32)

    saved = FewShotSlices(slices(5, 9)).state_dict()
    FewShotSlices(slices(5, 9)).load_state_dict(saved)  # the same selection resumes
    with pytest.raises(CheckpointError, match=r"trained on 2 few-shot slices .* selected 3 .*"
                                              r"\['imagesTr/case0.nii.gz', 'labelsTr/case0.nii.gz', 2, 9\] vs .* 10\]"):
        FewShotSlices(slices(5, 10, 12)).load_state_dict(saved)
