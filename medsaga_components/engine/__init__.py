"""Training and inference glue the bundle configs reference: the few-shot experiment,
schedules, handlers, export of plain weights, volume inference."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..backbones.checkpoints import load_checkpoint, load_state_dict_strict
from .command_line import check_bundle_command_line
from .cpu_allocator import keep_freed_cpu_memory
from .experiment import FewShotExperiment, experiment_dataset
from .export import merge_adapters, plain_state_dict, save_plain_model
from .flips import FlipAveraged, with_test_time_flips
from .handlers import EvaluateOnTestVolumes, SaveBestPlainModel, evaluate_test_volumes
from .memory import MemoryConfig, enable_memory_efficient_training
from .prediction_writer import AtomicNibabelWriter, register_atomic_nifti_writer
from .schedules import warmup_poly_scheduler
from .slice_inferer import SquareSliceInferer
from .zoom_inference import StructureCropTwoPass, ZoomedSlidingWindow, ZoomInferer, with_zoom, zoom_setting
from .stopping import TrainUntilPlateau
from .training_setup import prepare_training
from .transforms import ScaleIntensityForModalityd
from .volumes import dataset_modality, list_volumes

register_atomic_nifti_writer()  # run inference's SaveImaged writes predictions atomically (prediction_writer.py)


def find_bundle_root(name: str) -> str:
    """The bundle folder, whether a command runs inside it or at the repository root.

    Bundle configs use this as the default ``bundle_root``; ``--bundle_root`` overrides it.
    """
    cwd = Path.cwd()
    for candidate in (cwd, cwd / "bundles" / name):
        if (candidate / "configs" / "metadata.json").is_file() and candidate.name == name:
            return str(candidate)
    if (cwd / "configs" / "metadata.json").is_file():
        return str(cwd)
    raise FileNotFoundError(f"cannot find the {name} bundle from {cwd}: run from the repository root or the "
                            f"bundle folder, or pass --bundle_root")


def check_model_file(path: str | Path, network: nn.Module | None = None) -> None:
    """Fail before inference starts when the trained weights are missing, unreadable or unsafe
    (read once here through ``load_checkpoint``, so the error names the file), when they do
    not fit ``network`` (another backbone, number of classes or prompt kind: the error names
    the file and the mismatch; the weights are then loaded into it), or when the command line
    has a misspelled key."""
    check_bundle_command_line()
    if not Path(path).is_file():
        raise FileNotFoundError(f"model weights not found: {path} (run training first, or pass --model_path)")
    state = load_checkpoint(path, "model weights")
    if network is not None:
        load_state_dict_strict(network, state, path, "inference network_def (backbone, num_classes, prompt kind; "
                               "a model trained with configs/boxes.json needs configs/inference_boxes.json)")


def load_plain_model(network: nn.Module, path: str | Path) -> nn.Module:
    """``network`` with adapters merged and the plain weights of ``path`` loaded (strict)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"model weights not found: {path} (run training first, or pass --model_path)")
    plain = merge_adapters(network)
    load_state_dict_strict(plain, load_checkpoint(path, "model weights"), path, "network")
    return plain


__all__ = ["AtomicNibabelWriter", "FewShotExperiment", "merge_adapters", "plain_state_dict", "save_plain_model", "EvaluateOnTestVolumes",
           "SaveBestPlainModel", "evaluate_test_volumes", "warmup_poly_scheduler", "SquareSliceInferer", "TrainUntilPlateau",
           "ScaleIntensityForModalityd", "find_bundle_root", "load_plain_model", "check_model_file", "prepare_training",
           "list_volumes", "dataset_modality", "FlipAveraged", "with_test_time_flips", "StructureCropTwoPass", "ZoomedSlidingWindow", "ZoomInferer", "with_zoom", "zoom_setting", "keep_freed_cpu_memory"]
