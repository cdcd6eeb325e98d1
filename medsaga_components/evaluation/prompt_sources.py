"""What a user sees, per prompt source: whole-volume scores over a test region, side by side.

The prompts are what a user gives, made from the ground truth the way a user would make them:

* ``box_3d``: one 3-D box per structure (each 3-D connected piece of a class), the ground
  truth's bounding box with each side moved by up to ``jitter`` of its extent (a user's drag);
* ``labelled_slices``: the k labelled slices (the few-shot slices), completed to the volume;
* ``click``: one click per structure, in the middle of its largest cross-section;
* ``oracle_slice_boxes``: the tight ground-truth box of every structure on every test slice —
  an upper bound no user gives, labelled "oracle" wherever it appears;
* ``none``: no prompt (box-free two-pass inference; needs a model trained with boxes).

Baselines on the same slices: ``copy_nearest`` (each test slice takes the label of the nearest
labelled slice), ``interpolate`` (ITK's morphological contour interpolation between the labelled
slices, 3D Slicer's "fill between slices") and ``copy_box`` (a 3-D box's rectangle asked on every
slice it spans: what the MONAI Label app did before propagation).

Scores (``evaluation.metrics``) cover every slice of the test region, including slices where a
structure is absent (any prediction there counts against it): Dice, HD95 and NSD (surface Dice
at ``nsd_tolerance_mm``) per class, with the seconds and encoder passes each source took.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_surface_dice
from torch import nn

from medsaga_components import SamSegmenter
from medsaga_components.evaluation.metrics import evaluate_volume
from medsaga_components.inference.prompted import in_plane_axes
from medsaga_components.inference.slices import SquareSliceInferer
from medsaga_components.inference.volume import (
    ClassPredictor,
    SliceEmbeddings,
    box_around_structure,
    guide_network,
    label_map,
    segment_volume_from_boxes,
    segment_volume_from_clicks,
    segment_volume_from_labelled_slices,
)
from medsaga_components.prompts.from_labels import deepest_points, structure_masks

PROMPT_SOURCES = ("box_3d", "labelled_slices", "click", "oracle_slice_boxes", "none")
BASELINES = ("copy_nearest", "interpolate", "copy_box")
ORACLE = "oracle_slice_boxes"
MAX_STRUCTURES = 2  # 3-D structures per class: the demo classes merge a left and a right one


def user_boxes(label: np.ndarray, num_classes: int, jitter: float = 0.05, seed: int = 0) -> dict[int, list[list[float]]]:
    """One jittered 3-D box per structure, ``{class index: [[i0, j0, k0, i1, j1, k1], ...]}``."""
    rng = np.random.default_rng(seed)
    return {c: [box_around_structure(s, jitter, rng) for s in structure_masks(label == c, MAX_STRUCTURES)] for c in range(1, num_classes + 1)
            if (label == c).any()}


def user_clicks(label: np.ndarray, num_classes: int, axis: int) -> dict[int, list[list[int]]]:
    """One click per structure: on its largest cross-section along ``axis``, the voxel farthest
    from that cross-section's border (where a user clicks)."""
    clicks: dict[int, list[list[int]]] = {}
    for c in range(1, num_classes + 1):
        for structure in structure_masks(label == c, MAX_STRUCTURES):
            by_slice = np.moveaxis(structure, axis, 0)
            k = int(np.argmax(by_slice.reshape(by_slice.shape[0], -1).sum(axis=1)))
            (row, col), = deepest_points(by_slice[k], 1)
            rows, cols = in_plane_axes(axis)
            click = [0, 0, 0]
            click[axis], click[rows], click[cols] = k, int(row), int(col)
            clicks.setdefault(c, []).append(click)
    return clicks


def copy_nearest_labelled(label: np.ndarray, axis: int, labelled: Sequence[int], test: Sequence[int]) -> np.ndarray:
    """``[X, Y, Z]``: every test slice takes the label of the nearest labelled slice (the lower one on a tie)."""
    out = np.zeros_like(label)
    by_slice, target = np.moveaxis(label, axis, 0), np.moveaxis(out, axis, 0)
    for k in test:
        target[k] = by_slice[min(labelled, key=lambda s: (abs(s - k), s))]
    return out


def labelled_slices_only(label: np.ndarray, axis: int, labelled: Sequence[int]) -> np.ndarray:
    """``label`` on the ``labelled`` slices along ``axis``, 0 elsewhere: what a user has drawn."""
    partial = np.zeros_like(label)
    np.moveaxis(partial, axis, 0)[list(labelled)] = np.moveaxis(label, axis, 0)[list(labelled)]
    return partial


def interpolate_labelled(label: np.ndarray, axis: int, labelled: Sequence[int]) -> np.ndarray:
    """``[X, Y, Z]``: each class interpolated between the labelled slices that hold it, by ITK's
    morphological contour interpolation (Albu et al. 2008; the filter behind 3D Slicer's
    fill-between-slices). It only fills between two slices that both hold a class: a class that
    starts or ends between labelled slices is not extrapolated.

    Needs the ``evaluation`` extra (``pip install "medsaga[evaluation]"``).
    """
    try:
        import itk
    except ImportError as error:  # an optional extra: the baseline only
        raise ImportError('the interpolate baseline needs ITK\'s morphological contour interpolation: '
                          'pip install "medsaga[evaluation]"') from error
    partial = labelled_slices_only(label, axis, labelled).astype(np.uint8)
    # ITK orders axes the other way round from numpy: numpy axis a is ITK axis ndim - 1 - a.
    filled = itk.morphological_contour_interpolator(itk.image_from_array(partial), axis=label.ndim - 1 - axis)
    return itk.array_from_image(filled).astype(label.dtype)


def _oracle_slice_boxes(slices: SliceEmbeddings, label: np.ndarray, axis: int, test: Sequence[int]) -> np.ndarray:
    """Every structure of every test slice asked with its tight ground-truth box."""
    by_slice = np.moveaxis(label, axis, 0)

    def class_mask(predictor: ClassPredictor) -> np.ndarray:
        mask = np.zeros(by_slice.shape, dtype=bool)
        for k in test:
            for piece in structure_masks(by_slice[k] == predictor.class_index):
                rows, cols = np.nonzero(piece)
                mask[k] |= predictor(k, (float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())))
        return mask

    return np.moveaxis(label_map(slices, class_mask), 0, axis)


def _copy_box(slices: SliceEmbeddings, boxes: dict, axis: int, test: Sequence[int]) -> np.ndarray:
    """Each 3-D box's rectangle asked on every test slice it spans."""
    rows, cols = in_plane_axes(axis)

    def class_mask(predictor: ClassPredictor) -> np.ndarray:
        mask = np.zeros((slices.depth, *slices.shape), dtype=bool)
        for box in boxes.get(predictor.class_index, ()):
            for k in range(int(box[axis]), int(box[3 + axis]) + 1):
                if k in test:
                    mask[k] |= predictor(k, (box[cols], box[rows], box[3 + cols], box[3 + rows]))
        return mask

    return np.moveaxis(label_map(slices, class_mask), 0, axis)


@torch.no_grad()
def _box_free(network: nn.Module, image: torch.Tensor, axis: int, test: Sequence[int]) -> np.ndarray:
    """The test slices segmented as ``run inference`` does without prompts (``SquareSliceInferer``;
    a box-mode network finds its boxes in two passes)."""
    module = getattr(network, "module", network)
    logits = SquareSliceInferer(module.image_size, axis, batch_size=1)(image.index_select(1 + axis, torch.tensor(test))[None],
                                                                      network)
    out = np.zeros(image.shape[1:], dtype=np.uint8)
    np.moveaxis(out, axis, 0)[list(test)] = np.moveaxis(logits[0].argmax(0).numpy().astype(np.uint8), axis, 0)
    return out


def surface_dice(prediction: np.ndarray, truth: np.ndarray, num_classes: int, spacing: Sequence[float],
                 tolerance_mm: float) -> list[float | None]:
    """NSD per class (MONAI's ``compute_surface_dice``); None where both are empty."""
    pred = torch.nn.functional.one_hot(torch.as_tensor(prediction).long(), num_classes + 1).movedim(-1, 0)[None]
    true = torch.nn.functional.one_hot(torch.as_tensor(truth).long(), num_classes + 1).movedim(-1, 0)[None]
    values = compute_surface_dice(pred, true, [tolerance_mm] * num_classes, include_background=False,
                                  spacing=list(spacing))[0]
    return [None if torch.isnan(v) else float(v) for v in values]


def evaluate_prompt_sources(network: nn.Module, image: torch.Tensor, label: np.ndarray, axis: int,
                            labelled: Sequence[int], test: Sequence[int], class_names: Sequence[str],
                            sources: Sequence[str] = PROMPT_SOURCES + BASELINES, spacing: Sequence[float] = (1, 1, 1),
                            jitter: float = 0.05, seed: int = 0, nsd_tolerance_mm: float = 2.0,
                            log=print, guide: nn.Module | None = None) -> dict:
    """Score each prompt source on the test slices of one volume.

    Args:
        network: a box-prompted ``SamSegmenter`` (a box-mode bundle's model, or zero-shot LiteMedSAM).
        image: ``[C, X, Y, Z]`` preprocessed; label: ``[X, Y, Z]`` class indices 0..N (the ground truth,
            from which the user's prompts are made, and the reference).
        labelled: the user's labelled slices along ``axis``; test: the slices scored.
        class_names: the N + 1 names, background first.
        guide: the network that propagates the box, labelled-slice and click sources
            (``inference.volume.guide_network``; None: ``network`` itself).
    Returns:
        ``{source: {"per_class": [{"name", "dice", "hd95_mm", "nsd"}], "mean_dice", "mean_nsd", "mean_hd95_mm",
        "seconds", "encoder_passes", "oracle"}}``.
    """
    unknown = sorted(set(sources) - set(PROMPT_SOURCES + BASELINES))
    if unknown:
        raise ValueError(f"unknown prompt sources {unknown}; expected some of {list(PROMPT_SOURCES + BASELINES)}")
    n = len(class_names) - 1
    test = sorted(int(k) for k in test)
    boxes = user_boxes(label, n, jitter, seed)
    partial = labelled_slices_only(label, axis, labelled)
    runs = {
        "box_3d": lambda s: segment_volume_from_boxes(network, image, axis, boxes, slices=s, guide=guide),
        "labelled_slices": lambda s: segment_volume_from_labelled_slices(network, image, axis, partial, labelled,
                                                                         num_classes=n, slices=s, guide=guide),
        "click": lambda s: segment_volume_from_clicks(network, image, axis, user_clicks(label, n, axis), slices=s,
                                                      guide=guide),
        ORACLE: lambda s: _oracle_slice_boxes(s, label, axis, test),
        "none": lambda s: _box_free(network, image, axis, test),
        "copy_nearest": lambda s: copy_nearest_labelled(label, axis, labelled, test),
        "interpolate": lambda s: interpolate_labelled(label, axis, labelled),
        "copy_box": lambda s: _copy_box(s, boxes, axis, test),
    }
    results = {}
    for source in sources:
        slices = SliceEmbeddings(network, image, axis)
        start = time.monotonic()
        prediction = runs[source](slices)
        seconds = time.monotonic() - start
        pred_region = np.take(prediction, test, axis=axis)
        true_region = np.take(label, test, axis=axis)
        scored = evaluate_volume(pred_region, true_region, class_names, spacing=spacing, name=source)
        nsd = surface_dice(pred_region, true_region, n, spacing, nsd_tolerance_mm)
        per_class = [{"name": c["name"], "dice": c["dice"], "hd95_mm": c["hd95_mm"], "nsd": v}
                     for c, v in zip(scored["classes"], nsd)]
        nsd_values = [v for v in nsd if v is not None]
        results[source] = {"per_class": per_class, "mean_dice": scored["mean_dice"],
                           "mean_hd95_mm": scored["mean_hd95_mm"],
                           "mean_nsd": float(np.mean(nsd_values)) if nsd_values else None,
                           "seconds": round(seconds, 1), "encoder_passes": len(slices.encoded),
                           "encoder_seconds": round(slices.encoder_seconds, 1), "decoder_calls": slices.decoder_calls,
                           "oracle": source == ORACLE}
        dice = " / ".join(f"{c['dice']:.3f}" for c in per_class)
        log(f"{source}{' (oracle)' if source == ORACLE else ''}: mean Dice {scored['mean_dice']:.3f} ({dice}), "
            f"{seconds:.0f} s, {len(slices.encoded)} slices encoded")
    return results


def markdown_table(results: dict, prompts_note: str = "") -> str:
    """One row per source: per-class Dice, mean Dice, NSD, HD95, seconds, slices encoded."""
    lines = ["| prompts | per-class Dice | mean Dice | mean NSD (2 mm) | mean HD95 (mm) | seconds | slices encoded | "
             "time / encoder time |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for source, r in results.items():
        name = f"{source} (oracle)" if r["oracle"] else source
        dice = " / ".join(f"{c['dice']:.3f}" for c in r["per_class"])
        nsd = "" if r["mean_nsd"] is None else f"{r['mean_nsd']:.3f}"
        hd95 = "" if r["mean_hd95_mm"] is None else f"{r['mean_hd95_mm']:.2f}"
        ratio = f"{r['seconds'] / r['encoder_seconds']:.2f}" if r.get("encoder_seconds") else ""
        lines.append(f"| {name} | {dice} | {r['mean_dice']:.3f} | {nsd} | {hd95} | {r['seconds']:.0f} | "
                     f"{r['encoder_passes']} | {ratio} |")
    return "\n".join(lines) + ("\n\n" + prompts_note if prompts_note else "") + "\n"


def demo_labelled_slices(task: str, shots: int = 5, dataset_dir: str | None = None) -> list[int]:
    """The bundles' default few-shot slices of a demo task (``spacing="even"``, seed 0) as slice
    indices of the whole volume (each slab's start added back)."""
    import tempfile

    from medsaga_components.data.demo import load_demo_volume, write_demo_dataset
    from medsaga_components.data.fewshot import select_few_shot_slices
    from medsaga_components.data.decathlon import load_decathlon

    folder = dataset_dir or tempfile.mkdtemp(prefix=f"medsaga_{task}_")
    json_path = write_demo_dataset(folder, task=task) if dataset_dir is None else f"{folder}/dataset.json"
    dataset = load_decathlon(json_path)
    starts = {entry.image: start for entry, (start, _) in zip(dataset.splits["training"], load_demo_volume(task)[3]["training"])}
    return sorted(starts[ref.volume] + ref.slice_index for ref in select_few_shot_slices(dataset, shots, spacing="even"))


def prompt_sources_command(task: str = "small_structures", model: str = "zero_shot", out: str = "prompt_sources",
                           shots: int = 5, sources: str | Sequence[str] | None = None,
                           jitter: float = 0.05,
                           seed: int = 0, backbone: str = "lite_medsam", image_size: int = 256,
                           per_structure: bool = True, threads: int | None = None, bf16: str | bool = False,
                           openvino: str | bool = False, dataset_dir: str | None = None, split: str = "test",
                           guide: str = "self") -> dict:
    """``medsaga prompt-sources``: every prompt source side by side on a demo task's test slab.

    ``model``: ``zero_shot`` (pretrained LiteMedSAM asked with boxes) or the ``models/model.pt`` of a
    bundle trained in box mode (``configs/boxes.json``; ``per_structure``: its box-free first pass boxes
    each structure, as a model trained with ``--box_per_structure true``). ``bf16``: as the bundles'
    key (``precision.py``); ``openvino``: as theirs too (``inference/openvino_encoder.py``; off here by
    default, so that seconds compare with the recorded runs). ``guide``: what propagates the
    prompts, ``self`` or ``pretrained`` (``inference.volume.guide_network``; the bundles'
    ``propagation_guide``). Writes
    ``out/prompt_sources.json`` and ``.md``.

    ``dataset_dir``: score the labelled ``test`` volumes of that dataset.json instead, every slice
    of each (a cross-patient task such as ``lung_tumour_fold1``: the test patient has no labelled
    slice, so the sources are the user's 3-D boxes, clicks, no prompt and the oracle); the scores
    of several test volumes are averaged per source. ``split="validation"`` scores the validation
    volumes instead: where to choose ``guide`` and the margin for a dataset before looking at its test.
    """
    from pathlib import Path

    from medsaga_components.inference.model import load_plain_model
    from medsaga_components.io.atomic import write_json_atomic, write_text_atomic
    from medsaga_components.inference.openvino_encoder import encoder_runtime, use_openvino
    from medsaga_components.precision import use_bf16

    if threads:
        torch.set_num_threads(int(threads))
    volumes, labelled, names, note = (dataset_volumes(dataset_dir, split) if dataset_dir is not None
                                      else _demo_test_volume(task, shots))
    network = SamSegmenter(backbone, len(names) - 1, checkpoint="pretrained" if model == "zero_shot" else None,
                           image_size=image_size, prompt="boxes" if model == "zero_shot" else "mcp")
    if model != "zero_shot":
        from medsaga_components.inference.two_pass import TwoPassBoxSegmenter

        network = load_plain_model(TwoPassBoxSegmenter(backbone, len(names) - 1, checkpoint=None, image_size=image_size,
                                                       modality_prompt=False, content_prompt=False,
                                                       per_structure=per_structure), model)
    network = use_openvino(use_bf16(network.eval(), bf16), openvino)
    guide_net = guide_network(guide, network)
    if sources is None:
        sources = PROMPT_SOURCES + BASELINES if labelled else ("box_3d", "click", ORACLE, "none")
    # fire hands "a,b" over as a tuple; a string may come from Python
    wanted = [s.strip() for s in (sources.split(",") if isinstance(sources, str) else sources) if s.strip()]
    if model == "zero_shot":
        wanted = [s for s in wanted if s != "none"]  # no class tokens: nothing to ask without a prompt
    if not labelled and set(wanted) & {"labelled_slices", "copy_nearest", "interpolate"}:
        raise ValueError("the test volumes of a dataset_dir have no labelled slices: leave out labelled_slices, "
                         "copy_nearest and interpolate")
    per_volume = {}
    for name, (volume, label, spacing, test) in volumes.items():
        per_volume[name] = evaluate_prompt_sources(network, volume, label, 2, labelled, test, names, wanted,
                                                   spacing, jitter, seed, guide=guide_net)
    results = per_volume[next(iter(per_volume))] if len(per_volume) == 1 else average_results(per_volume)
    guided = "" if guide_net is None else ", propagated by pretrained LiteMedSAM (each slice encoded by both models)"
    note = (f"{note}, model {model} (image encoder: {encoder_runtime(network)}){guided}; 3-D boxes jittered by up "
            f"to {jitter:.0%} of each side's extent (seed {seed}).")
    out_dir = Path(out)
    write_json_atomic(out_dir / "prompt_sources.json", {"task": dataset_dir or task, "model": model, "guide": guide,
                                                        "labelled": labelled, "results": results,
                                                        "per_volume": per_volume})
    write_text_atomic(out_dir / "prompt_sources.md", markdown_table(results, note))
    return {source: round(r["mean_dice"], 4) for source, r in results.items()}


def _demo_test_volume(task: str, shots: int):
    """A demo task's whole volume, its k labelled slices and test slab (slice indices)."""
    from medsaga_components.data.demo import LABELS, SMALL_STRUCTURES, load_demo_volume
    from medsaga_components.data.demo_small_structures import LABELS as SMALL_LABELS
    from medsaga_components.data.intensity import scale_intensity
    from medsaga_components.evaluation.metrics import voxel_spacing

    names = list((SMALL_LABELS if task == SMALL_STRUCTURES else LABELS).values())
    image, label, affine, slabs = load_demo_volume(task)
    volume = torch.from_numpy(scale_intensity(image.astype(np.float32), "MRI"))[None]
    labelled = demo_labelled_slices(task, shots)
    test = [k for start, stop in slabs["test"] for k in range(start, stop)]
    note = f"{task}, labelled slices {labelled} (k = {shots}), test slices {test[0]}..{test[-1]}"
    return {task: (volume, label.astype(np.int64), voxel_spacing(affine), test)}, labelled, names, note


def dataset_volumes(dataset_dir: str, split: str = "test"):
    """Every labelled volume of a dataset.json's ``split``, whole (all its slices along axis 2)."""
    from medsaga_components.data.decathlon import load_decathlon
    from medsaga_components.data.intensity import scale_intensity
    from medsaga_components.data.volume_io import read_image
    from medsaga_components.evaluation.metrics import voxel_spacing

    dataset = load_decathlon(dataset_dir)
    volumes = {}
    for entry in dataset.entries(split):
        if entry.label_path is None:
            continue
        image, affine = read_image(entry.image_path, dataset.nonfinite_fill)
        label = dataset.class_map.to_indices(dataset.read_label(entry)).astype(np.int64)
        volume = torch.from_numpy(scale_intensity(image, dataset.modality))[None]
        volumes[entry.image] = (volume, label, voxel_spacing(affine), list(range(image.shape[2])))
    if not volumes:
        raise ValueError(f"{dataset.path}: no labelled {split} volume to score")
    return volumes, [], list(dataset.class_names), f"{dataset.name}, {split} volumes {list(volumes)} (every slice)"


def average_results(per_volume: dict[str, dict]) -> dict:
    """Per source, the mean over volumes of each score (a class absent from a volume is skipped)."""
    first = next(iter(per_volume.values()))
    averaged = {}
    for source, r in first.items():
        runs = [v[source] for v in per_volume.values()]

        def mean(values):
            values = [x for x in values if x is not None]
            return float(np.mean(values)) if values else None

        per_class = [{key: c[key] if key == "name" else mean([run["per_class"][i][key] for run in runs])
                      for key in c} for i, c in enumerate(r["per_class"])]
        averaged[source] = {**{key: mean([run[key] for run in runs]) for key in
                               ("mean_dice", "mean_hd95_mm", "mean_nsd", "seconds", "encoder_passes",
                                "encoder_seconds", "decoder_calls")},
                            "per_class": per_class, "oracle": r["oracle"]}
    return averaged
