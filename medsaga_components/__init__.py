"""medsaga: memory-efficient, few-shot adaptation of SAM to medical image segmentation.

The package every medsaga MONAI bundle references. Submodules, one idea each:
``backbones`` (SAM ViT-B/L/H, LiteMedSAM), ``network`` (SamSegmenter), ``prompts``,
``adapters`` (LoRA, SVD, GaLore groups), ``data``, ``evaluation``, ``engine``, ``cli``.
"""

from .backbones import BACKBONES, CheckpointError, SamBackbone, build_backbone
from .config_values import as_bool
from .network import SamSegmenter
from medsaga_components.prompts import PROMPT_KINDS, PromptKind

__version__ = "0.1.0"

__all__ = ["BACKBONES", "CheckpointError", "SamBackbone", "build_backbone", "SamSegmenter", "PROMPT_KINDS",
           "PromptKind", "__version__", "as_bool"]
