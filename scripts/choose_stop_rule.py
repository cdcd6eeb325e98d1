"""Measure propagation's stop rule and margin on a demo task (docs/prompted_volumes.md).

    .venv/bin/python scripts/choose_stop_rule.py --task small_structures --model bundles/medsaga/models/model.pt

One process, one thread: every slice is encoded once (a shared ``SliceEmbeddings``) and each
setting only re-runs the decoder, so the settings are compared on the same embeddings. Prints
the mean Dice over the test slab of the 3-D box and the labelled-slice sources for each setting
(stop rule, margin, refinement of a box's seed slice, fronts or interpolated boxes between
labelled slices, where a structure that a labelled slice does not hold ends: by the stop rule or
midway).
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

from medsaga_components import SamSegmenter
from medsaga_components.data.demo import LABELS, SMALL_STRUCTURES, load_demo_volume
from medsaga_components.data.demo_small_structures import LABELS as SMALL_LABELS
from medsaga_components.data.intensity import scale_intensity
from medsaga_components.evaluation.metrics import evaluate_volume
from medsaga_components.evaluation.prompt_sources import demo_labelled_slices, user_boxes
from medsaga_components.inference.model import load_plain_model
from medsaga_components.inference.propagation import END_IN_GAP, StopRule
from medsaga_components.inference.two_pass import TwoPassBoxSegmenter
from medsaga_components.inference.volume import (
    SliceEmbeddings,
    segment_volume_from_boxes,
    segment_volume_from_labelled_slices,
)

STOP_RULES = {
    "vanishes": StopRule(min_pixels=1),
    "overlap below 0.5": StopRule(min_pixels=1, min_overlap=0.5),
    "overlap below 0.3": StopRule(min_pixels=1, min_overlap=0.3),
    "shrinks below 0.5": StopRule(min_pixels=1, min_area_ratio=0.5),
}
MARGINS = (0.0, 0.05, 0.1, 0.2, 0.3)
REFINE_SEED = (0, 1)
BETWEEN = ("fronts", "interpolate")
LABELLED_SETTINGS = tuple(itertools.product(END_IN_GAP, BETWEEN))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default=SMALL_STRUCTURES)
    parser.add_argument("--model", default="zero_shot")
    parser.add_argument("--margins", default=",".join(map(str, MARGINS)), help="comma-separated")
    parser.add_argument("--refine_seed", default=",".join(map(str, REFINE_SEED)), help="comma-separated")
    args = parser.parse_args()
    margins = [float(m) for m in args.margins.split(",")]
    refines = [int(r) for r in args.refine_seed.split(",")]
    torch.set_num_threads(1)
    names = list((SMALL_LABELS if args.task == SMALL_STRUCTURES else LABELS).values())
    n = len(names) - 1
    image, label, _, slabs = load_demo_volume(args.task)
    label = label.astype(np.int64)
    volume = torch.from_numpy(scale_intensity(image.astype(np.float32), "MRI"))[None]
    if args.model == "zero_shot":
        network = SamSegmenter("lite_medsam", n, prompt="boxes")
    else:
        network = load_plain_model(TwoPassBoxSegmenter("lite_medsam", n, checkpoint=None, modality_prompt=False,
                                                       content_prompt=False), args.model)
    network = network.eval()
    test = [k for start, stop in slabs["test"] for k in range(start, stop)]
    labelled = demo_labelled_slices(args.task)
    partial = np.zeros_like(label)
    partial[..., labelled] = label[..., labelled]
    boxes = user_boxes(label, n)
    slices = SliceEmbeddings(network, volume, 2)

    def score(prediction: np.ndarray) -> float:
        return evaluate_volume(prediction[..., test], label[..., test], names)["mean_dice"]

    print(f"{args.task}, model {args.model}, test z {test[0]}..{test[-1]}, labelled {labelled}")
    settings = " / ".join(f"{between} ending by {end}" for end, between in LABELLED_SETTINGS)
    print(f"| stop rule | margin | 3-D box, seed refined {' / '.join(map(str, refines))} times | labelled slices, "
          f"{settings} | seconds |")
    print("|---|---:|---|---|---:|")
    for margin, (rule, stop) in itertools.product(margins, STOP_RULES.items()):
        start = time.monotonic()
        from_box = [score(segment_volume_from_boxes(network, volume, 2, boxes, margin=margin, stop=stop, slices=slices,
                                                    refine_seed=refine)) for refine in refines]
        from_slices = [score(segment_volume_from_labelled_slices(network, volume, 2, partial, labelled, margin=margin,
                                                                 stop=stop, num_classes=n, slices=slices,
                                                                 between=between, end_in_gap=end))
                       for end, between in LABELLED_SETTINGS]
        print(f"| {rule} | {margin} | {' / '.join(f'{d:.3f}' for d in from_box)} | "
              f"{' / '.join(f'{d:.3f}' for d in from_slices)} | {time.monotonic() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
