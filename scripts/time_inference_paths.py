"""Time the two paths from models/model.pt to label maps on a dataset's test volumes, and compare them.

    python scripts/time_inference_paths.py evaluation --model_path M --dataset_dir D --out OUT
    python scripts/time_inference_paths.py inference --model_path M --dataset_dir D --out OUT
    python scripts/time_inference_paths.py compare --dataset_dir D --out OUT

``evaluation``: ``evaluate_test_volumes`` (what training's test evaluation and ``run evaluating``
call) on every slice of the test volumes, with the CPU allocator setting those runs use;
writes ``OUT/evaluation/predictions/*.nii.gz``. ``inference``: the bundle's inference.json, as
``python -m monai.bundle run inference`` runs it; writes ``OUT/inference/*_seg.nii.gz``. Each
prints the seconds per slice of the work itself (model loading and imports left out), wall
clock and this process's CPU time (the steadier figure on a shared machine); run each in its
own process. ``compare``: Dice per class between the two label maps, and of each
against the ground truth.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

import medsaga_components
from medsaga_components import SamSegmenter
from medsaga_components.data import SliceDataset, load_decathlon
from medsaga_components.data.manifest import SliceRef
from medsaga_components.evaluation.test_volumes import evaluate_test_volumes
from medsaga_components.inference.model import load_plain_model
from medsaga_components.training.cpu_allocator import keep_freed_cpu_memory

BUNDLES = Path(medsaga_components.__file__).resolve().parents[1] / "bundles"


def _test_slices(dataset_dir: Path, image_size: int) -> SliceDataset:
    dataset = load_decathlon(dataset_dir)
    refs = [SliceRef(e.image, e.label, 2, z) for e in dataset.entries("test")
            for z in range(nib.load(str(e.image_path)).shape[2])]
    return SliceDataset(dataset, refs, image_size)


def time_evaluation(args: argparse.Namespace) -> tuple[float, float]:
    keep_freed_cpu_memory(True)
    slices = _test_slices(args.dataset_dir, args.image_size)
    network = load_plain_model(SamSegmenter(args.backbone, args.num_classes, checkpoint=None,
                                            image_size=args.image_size, prompt=args.prompt), args.model_path)
    start, cpu_start = time.perf_counter(), time.process_time()
    evaluate_test_volumes(network, slices, args.out / "evaluation", batch_size=args.eval_batch_size,
                          test_time_flips=args.test_time_flips)
    return (time.perf_counter() - start) / len(slices), (time.process_time() - cpu_start) / len(slices)


def time_inference(args: argparse.Namespace) -> tuple[float, float]:
    from monai.bundle import ConfigWorkflow

    configs = BUNDLES / args.bundle / "configs"
    workflow = ConfigWorkflow(config_file=str(configs / "inference.json"), workflow_type="infer",
                              meta_file=str(configs / "metadata.json"), logging_file=str(configs / "logging.conf"),
                              bundle_root=str(BUNDLES / args.bundle), dataset_dir=str(args.dataset_dir),
                              model_path=str(args.model_path), output_dir=str(args.out / "inference"),
                              backbone=args.backbone, image_size=args.image_size, num_classes=args.num_classes,
                              eval_batch_size=args.eval_batch_size, test_time_flips=args.test_time_flips)
    workflow.initialize()
    start, cpu_start = time.perf_counter(), time.process_time()
    workflow.run()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    count = len(_test_slices(args.dataset_dir, args.image_size))
    return wall / count, cpu / count


def _dice(a: np.ndarray, b: np.ndarray, c: int) -> float:
    total = (a == c).sum() + (b == c).sum()
    return float(2 * ((a == c) & (b == c)).sum() / total) if total else 1.0


def compare(args: argparse.Namespace) -> list[dict]:
    """Per test volume: Dice per class between the label maps, and of each against the truth."""
    dataset = load_decathlon(args.dataset_dir)
    values = dataset.class_map.label_values[1:]  # the foreground classes as stored in label files
    rows = []
    for entry in dataset.entries("test"):
        name = Path(entry.image).name.removesuffix(".nii.gz")
        evaluated = np.asarray(nib.load(args.out / "evaluation" / "predictions" / f"{name}.nii.gz").dataobj)
        inferred = dataset.class_map.to_values(
            np.asarray(nib.load(args.out / "inference" / f"{name}_seg.nii.gz").dataobj).reshape(evaluated.shape))
        truth = np.asarray(nib.load(str(entry.label_path)).dataobj)
        rows.append({"volume": name, "voxels_differing": int((evaluated != inferred).sum()),
                     "dice_between": [round(_dice(evaluated, inferred, v), 4) for v in values],
                     "evaluation_vs_truth": [round(_dice(evaluated, truth, v), 4) for v in values],
                     "inference_vs_truth": [round(_dice(inferred, truth, v), 4) for v in values]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", choices=["evaluation", "inference", "compare"])
    parser.add_argument("--dataset_dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model_path", type=Path)
    parser.add_argument("--bundle", default="medsaga")
    parser.add_argument("--backbone", default="lite_medsam")
    parser.add_argument("--prompt", default="none", help="the network's prompt kind (ssam: class_tokens)")
    parser.add_argument("--num_classes", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--eval_batch_size", type=int, default=1)
    parser.add_argument("--test_time_flips", type=lambda s: s.lower() == "true", default=True)
    args = parser.parse_args()
    if args.path == "compare":
        for row in compare(args):
            print(json.dumps(row))
        return
    if args.model_path is None:
        parser.error(f"{args.path} needs --model_path")
    wall, cpu = (time_evaluation if args.path == "evaluation" else time_inference)(args)
    print(f"{args.path}: {wall:.2f} s per slice, {cpu:.2f} s of CPU time per slice ({torch.get_num_threads()} "
          f"threads, test_time_flips {args.test_time_flips})")


if __name__ == "__main__":
    main()
