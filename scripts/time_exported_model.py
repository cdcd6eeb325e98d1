"""Is an exported model worth shipping? TorchScript and OpenVINO against eager PyTorch on a dataset's test slices.

    python scripts/time_exported_model.py --model_path M --dataset_dir D [--slices 24] [--threads 2]

The bundle's prompt-free network (``models/model.pt``) is exported the way ``python -m monai.bundle
ckpt_export --use_trace true`` exports it: ``torch.jit.trace`` on one ``[1, 1, S, S]`` slice; then
frozen and passed through ``torch.jit.optimize_for_inference``, as a deployment would. Six paths
run one forward per slice, interleaved slice by slice so that they share the machine's load:
eager float32, eager with the image encoder under bf16 autocast (the bundles' ``--bf16 true``),
traced float32 and traced bf16 (traced with the autocast on), and the image encoder compiled by
OpenVINO in float32 and in bf16 (the bundles' ``openvino`` key, ``inference/openvino_encoder.py``;
the rest of the network stays eager). Printed per path: the median
seconds per slice, and the mean Dice over classes against eager float32 and against the ground
truth. The issue's rule: keep an exported path only where it is >= 1.3x faster than bf16 eager at
equal Dice.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from medsaga_components import SamSegmenter
from medsaga_components.inference.model import load_plain_model
from medsaga_components.inference.openvino_encoder import use_openvino
from medsaga_components.precision import use_bf16
from time_inference_paths import _dice, _test_slices  # the sibling script: same test slices, same Dice


def spread_test_slices(dataset_dir: Path, image_size: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``count`` test slices, evenly spread: ``(image [1, 1, S, S], label [S, S])``."""
    slices = _test_slices(dataset_dir, image_size)
    picked = range(0, len(slices), max(1, len(slices) // count))[:count]
    return [(slices[i]["image"][None].float(), slices[i]["label"][0].long()) for i in picked]


def dice(prediction: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean over foreground classes of the Dice over all slices (``[K, S, S]`` class maps)."""
    return sum(_dice(prediction.numpy(), target.numpy(), c) for c in range(1, num_classes + 1)) / num_classes


def exported(network: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with torch.no_grad():
        traced = torch.jit.trace(network, example, check_trace=False)
    return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", type=Path, required=True)
    parser.add_argument("--dataset_dir", type=Path, required=True)
    parser.add_argument("--backbone", default="lite_medsam")
    parser.add_argument("--num_classes", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    slices = spread_test_slices(args.dataset_dir, args.image_size, args.slices)
    network = load_plain_model(SamSegmenter(args.backbone, args.num_classes, checkpoint=None,
                                            image_size=args.image_size), args.model_path).eval()
    bf16 = use_bf16(copy.deepcopy(network), True).eval()
    example = slices[0][0]
    start = time.perf_counter()
    paths = {"eager float32": network, "eager bf16": bf16,
             "traced float32": exported(network, example), "traced bf16": exported(bf16, example),
             "OpenVINO encoder float32": use_openvino(copy.deepcopy(network), True),
             "OpenVINO encoder bf16": use_openvino(use_bf16(copy.deepcopy(network), True), True)}
    print(f"exported both in {time.perf_counter() - start:.1f} s")

    seconds = {name: [] for name in paths}
    labels = {name: [] for name in paths}
    with torch.no_grad():
        for name, path in paths.items():  # warm-up: the traced paths optimise, OpenVINO compiles, on first calls
            for _ in range(2):
                path(example)
        for image, _ in slices:
            for name, path in paths.items():
                start = time.perf_counter()
                logits = path(image)
                seconds[name].append(time.perf_counter() - start)
                labels[name].append(logits.float().argmax(dim=1)[0])
    truth = torch.stack([label for _, label in slices])
    reference = torch.stack(labels["eager float32"])
    eager_bf16 = statistics.median(seconds["eager bf16"])
    print(f"{len(slices)} test slices of {args.dataset_dir.name}, {args.image_size} px, {args.threads} threads, "
          f"torch {torch.__version__}")
    print("| path | median s / slice | speed-up over eager bf16 | Dice vs eager float32 | Dice vs truth |")
    print("|---|---:|---:|---:|---:|")
    for name in paths:
        median = statistics.median(seconds[name])
        predicted = torch.stack(labels[name])
        print(f"| {name} | {median:.3f} | {eager_bf16 / median:.2f}x | "
              f"{dice(predicted, reference, args.num_classes):.4f} | {dice(predicted, truth, args.num_classes):.4f} |")


if __name__ == "__main__":
    main()
