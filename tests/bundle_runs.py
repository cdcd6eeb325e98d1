"""Running bundles the way users do: ``python -m monai.bundle run ...`` in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A run of seconds: tiny random LiteMedSAM-shaped backbone at 64 px, 2 epochs of 2 steps.
TINY_TRAINING = ["--backbone", "lite_medsam_tiny", "--checkpoint", "None", "--image_size", "64", "--epochs", "2",
                 "--steps_per_epoch", "2", "--batch_size", "2", "--val_interval", "1"]


def configs(bundle: str, *names: str) -> str:
    files = [str(REPO / "bundles" / bundle / "configs" / f"{n}.json") for n in names]
    return files[0] if len(files) == 1 else str(files)


def run_bundle(run_id: str, config_file: str, *overrides: str, launcher: list[str] | None = None,
               check: bool = True, cwd: Path = REPO) -> subprocess.CompletedProcess:
    command = (launcher or [sys.executable]) + ["-m", "monai.bundle", "run", run_id, "--config_file", config_file,
                                                *overrides]
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=900)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}")
    return done
