"""medsaga: memory-efficient, few-shot adaptation of SAM to medical image segmentation.

The package every medsaga MONAI bundle references; docs/architecture.md says where each concept
lives. Folders: ``backbones`` (SAM ViT-B/L/H, LiteMedSAM), ``adapters`` (LoRA, SVD, export),
``optimizers`` (GaLore, per-layer steps, schedules), ``prompts``, ``data``, ``training``,
``inference``, ``evaluation``, ``io``, and ``engine`` (what bundle configs reference).
"""

from medsaga_components.backbones import BACKBONES, CheckpointError, SamBackbone, build_backbone
from medsaga_components.config_values import as_bool
from medsaga_components.network import SamSegmenter
from medsaga_components.prompts import PROMPT_KINDS, PromptKind

__version__ = "0.1.0"

__all__ = ["BACKBONES", "CheckpointError", "SamBackbone", "build_backbone", "SamSegmenter", "PROMPT_KINDS",
           "PromptKind", "__version__", "as_bool"]
