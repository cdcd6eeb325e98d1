"""What the bundle configs reference (``medsaga_components.engine.X``), re-exported from where it
lives, so that the configs name one stable place. No logic here: training is in ``training/``,
inference in ``inference/``, prompts in ``prompts/``, the test evaluation in ``evaluation/``."""

from medsaga_components.bundle_config import find_bundle_root
from medsaga_components.evaluation.test_volumes import EvaluateOnTestVolumes, evaluation_points
from medsaga_components.inference.model import check_model_file, served_labels
from medsaga_components.inference.openvino_encoder import use_openvino
from medsaga_components.inference.preprocessing import CheckVolumed, LoadVolumed, ScaleIntensityForModalityd, check_volumes
from medsaga_components.inference.slices import SquareSliceInferer
from medsaga_components.inference.two_pass import TwoPassBoxSegmenter, TwoPassInferer, TwoPassPointSegmenter
from medsaga_components.inference.volume import VolumePrompts
from medsaga_components.inference.volumes import dataset_modality, list_volumes
from medsaga_components.inference.writer import DicomSegWriter, prediction_saver, register_atomic_nifti_writer
from medsaga_components.inference.zoom import ZoomInferer
from medsaga_components.precision import use_bf16
from medsaga_components.prompts.box_batches import McpPrepareBatch
from medsaga_components.prompts.from_labels import PromptsFromLabels
from medsaga_components.training.cpu_allocator import keep_freed_cpu_memory
from medsaga_components.training.experiment import FewShotExperiment, experiment_dataset
from medsaga_components.training.handlers import SaveBestPlainModel, handlers_for_this_process
from medsaga_components.training.memory import enable_memory_efficient_training
from medsaga_components.training.setup import prepare_training
from medsaga_components.training.stopping import TrainUntilPlateau
from medsaga_components.training.volume_validation import BoxRequestsFromLabels, validation_volumes

__all__ = [
    "CheckVolumed", "check_volumes", "DicomSegWriter", "LoadVolumed", "EvaluateOnTestVolumes", "FewShotExperiment", "McpPrepareBatch", "PromptsFromLabels", "SaveBestPlainModel",
    "ScaleIntensityForModalityd", "SquareSliceInferer", "TrainUntilPlateau", "TwoPassBoxSegmenter", "TwoPassInferer",
    "TwoPassPointSegmenter", "ZoomInferer", "check_model_file", "dataset_modality",
    "enable_memory_efficient_training", "evaluation_points",
    "experiment_dataset", "handlers_for_this_process", "find_bundle_root", "keep_freed_cpu_memory", "list_volumes",
    "prediction_saver", "prepare_training", "register_atomic_nifti_writer", "served_labels", "use_bf16", "use_openvino",
    "VolumePrompts",
    "BoxRequestsFromLabels", "validation_volumes",
]
