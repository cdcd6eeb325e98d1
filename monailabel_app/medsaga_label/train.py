"""Few-shot training from the labels users saved, with the bundle's own train config.

The task writes the labelled images as a Decathlon ``dataset.json`` (paths into the
studies folder), then runs ``python -m monai.bundle run training`` on the bundle's
``configs/train.json`` in a subprocess with ``--dataset_dir`` set to it, ``--finetune True``
when a model exists (training continues from it) and the app's and the request's overrides.
Training writes ``models/model.pt`` atomically; the infer tasks load it on their next request.

Built on MONAI Label's ``TrainTask`` interface rather than ``BasicTrainTask``: the bundle's
train config already holds the training (few-shot selection, the method's optimiser and
adapters, export of merged weights), and running it as users do keeps one training path.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from medsaga_components.io.atomic import write_json_atomic

from .bundles import ServedBundle

logger = logging.getLogger(__name__)

# Request keys MONAI Label adds itself; not bundle overrides.
MONAILABEL_KEYS = {"model", "gpus", "local_rank", "bundle_path", "multi_gpu", "device", "name", "dataset",
                   "pretrained", "max_epochs", "early_stop_patience", "val_split", "train_batch_size",
                   "val_batch_size"}


class BundleFewShotTraining(TrainTask):
    """Train (or fine-tune) one bundle on the images that have a final label.

    Args:
        bundle: the bundle served.
        work_dir: where the dataset.json and the training log of each run go.
        overrides: top-level train.json keys for every run (e.g. a smaller backbone); a
            request's own keys (``{"epochs": 4}``) are added on top.
        modality: the ``dataset.json`` modality of the studies (intensity scaling), e.g. "MRI" or "CT".
    """

    def __init__(self, bundle: ServedBundle, work_dir: str | Path, overrides: Mapping[str, Any] | None = None,
                 modality: str = "MRI") -> None:
        super().__init__(f"{bundle.name}: few-shot training from the saved labels ({bundle.root / 'configs' / 'train.json'})")
        self.bundle = bundle
        self.work_dir = Path(work_dir) / bundle.name
        self.overrides = dict(overrides or {})
        self.modality = modality

    def config(self) -> dict:
        return {"epochs": self.overrides.get("epochs", (self.bundle.train_config or {}).get("epochs")),
                "shots": self.overrides.get("shots", (self.bundle.train_config or {}).get("shots"))}

    def stats(self) -> dict:
        summary = self.work_dir / "last_run.json"
        return json.loads(summary.read_text()) if summary.is_file() else {}

    def write_dataset(self, datalist: list[dict]) -> Path:
        """The labelled images as a Decathlon dataset folder; returns the folder."""
        labelled = [d for d in datalist if d.get("label")]
        if not labelled:
            raise ValueError(f"{self.bundle.name}: no image has a saved final label yet; save labels, then train")
        labels = {"0": "background", **{str(v): k for k, v in sorted(self.bundle.labels.items(), key=lambda kv: kv[1])}}
        folder = self.work_dir / "dataset"
        write_json_atomic(folder / "dataset.json", {
            "name": f"{self.bundle.name} labels saved in MONAI Label",
            "labels": labels,
            "modality": {"0": self.modality},
            "training": [{"image": str(Path(d["image"]).resolve()),
                          "label": str(nifti_label(Path(d["image"]), Path(d["label"]), folder / "labels"))}
                         for d in labelled],
            "test": [],
        })
        return folder

    def command(self, dataset_dir: Path, request: Mapping[str, Any]) -> list[str]:
        """The ``monai.bundle run training`` command line of one run."""
        if self.bundle.train_config is None:
            raise ValueError(f"{self.bundle.root / 'configs' / 'train.json'} not found: the bundle cannot train")
        overrides = {**self.overrides, **{k: v for k, v in request.items() if k not in MONAILABEL_KEYS}}
        overrides.setdefault("finetune", self.bundle.model_path.is_file())
        args = [sys.executable, "-m", "monai.bundle", "run", "training",
                "--config_file", str(self.bundle.root / "configs" / "train.json"),
                "--bundle_root", str(self.bundle.root), "--dataset_dir", str(dataset_dir),
                "--output_dir", str(self.work_dir / "eval")]
        for key, value in overrides.items():
            args += [f"--{key}", _cli_value(value)]
        return args

    def __call__(self, request, datastore: Datastore):
        dataset_dir = self.write_dataset(datastore.datalist())
        command = self.command(dataset_dir, request)
        logger.info("training %s: %s", self.bundle.name, " ".join(command))
        started = time.time()
        log_path = self.work_dir / "training.log"
        with open(log_path, "w") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.bundle.root)
        tail = log_path.read_text()[-3000:]
        summary = {"model": self.bundle.name, "returncode": done.returncode, "seconds": round(time.time() - started, 1),
                   "images": len(json.loads((dataset_dir / "dataset.json").read_text())["training"]),
                   "model_path": str(self.bundle.model_path), "log": str(log_path)}
        write_json_atomic(self.work_dir / "last_run.json", summary)
        if done.returncode != 0:
            raise RuntimeError(f"training {self.bundle.name} failed (exit {done.returncode}); log {log_path}:\n{tail}")
        logger.info("training %s finished in %.0f s", self.bundle.name, summary["seconds"])
        return summary


def nifti_label(image: Path, label: Path, folder: Path) -> Path:
    """``label`` as the bundles read it: NIfTI on its image's grid. A label in another format (a
    DICOM SEG from a PACS arrives as NRRD, covering the SEG's frames) is resampled onto the
    image's voxels (nearest neighbour) and written into ``folder``."""
    if label.name.endswith((".nii", ".nii.gz")):
        return label.resolve()
    import SimpleITK

    reference = SimpleITK.ReadImage(str(image))
    resampled = SimpleITK.Resample(SimpleITK.ReadImage(str(label)), reference, SimpleITK.Transform(),
                                   SimpleITK.sitkNearestNeighbor, 0, SimpleITK.sitkUInt8)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / (label.name.rsplit(".", 1)[0] + ".nii.gz")
    SimpleITK.WriteImage(resampled, str(out))
    return out.resolve()


def _cli_value(value: Any) -> str:
    """A value as ``monai.bundle run`` (fire) reads it back: Python literals, strings as they are."""
    return value if isinstance(value, str) else repr(value)
