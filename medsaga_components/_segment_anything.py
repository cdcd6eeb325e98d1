"""segment-anything's modeling code, imported without its package ``__init__``.

``segment_anything/__init__.py`` imports the predictor and the automatic mask generator,
which need torchvision; torchvision cannot be imported next to the CPU build of torch
that medsaga installs. The modeling code itself needs only torch, so this is the one
place that registers the package module without executing its ``__init__`` and then
imports ``segment_anything.modeling`` normally. Everything in medsaga imports SAM's
classes from here.
"""

from __future__ import annotations

import importlib.util
import sys

if "segment_anything" not in sys.modules:
    _spec = importlib.util.find_spec("segment_anything")  # locates it, runs nothing
    if _spec is None:
        raise ImportError("segment-anything is not installed: pip install segment-anything==1.0")
    sys.modules["segment_anything"] = importlib.util.module_from_spec(_spec)

from segment_anything.modeling import (  # noqa: E402
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    TwoWayTransformer,
)
from segment_anything.modeling.common import LayerNorm2d  # noqa: E402

__all__ = ["ImageEncoderViT", "MaskDecoder", "PromptEncoder", "TwoWayTransformer", "LayerNorm2d"]
