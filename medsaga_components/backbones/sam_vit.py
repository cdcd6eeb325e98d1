"""SAM's ViT image encoders (ViT-B/L/H and a tiny random one for tests) at any image size.

Official checkpoints are trained at 1024 px. At another size S the absolute position
embedding (a 64 x 64 grid) and the relative position tables of the global-attention
blocks (2 * 64 - 1 rows) are resized to the S / 16 grid when the checkpoint is loaded,
as SAMed does for 512 px; windowed blocks keep their 14 x 14 tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from .._segment_anything import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from medsaga_components.io.checkpoints import load_state_dict_strict, read_state_dict
from .sam_backbone import SamBackbone

PATCH_SIZE = 16
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class VitSpec:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    prompt_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    window_size: int = 14
    default_image_size: int = 1024
    url: str | None = None
    sha256: str | None = None


VIT_SPECS = {
    "vit_b": VitSpec(768, 12, 12, (2, 5, 8, 11),
                     url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
                     sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
    "vit_l": VitSpec(1024, 24, 16, (5, 11, 17, 23),
                     url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
                     sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "vit_h": VitSpec(1280, 32, 16, (7, 15, 23, 31),
                     url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
                     sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
    # Random weights only: same code paths as ViT-B (windowed + global blocks) in milliseconds.
    "vit_tiny": VitSpec(32, 2, 2, (1,), prompt_dim=32, decoder_mlp_dim=64, decoder_heads=2,
                        window_size=2, default_image_size=64),
}


def build_sam_vit(name: str, image_size: int | None = None, checkpoint: str | Path | None = None) -> SamBackbone:
    """Build ``vit_b``/``vit_l``/``vit_h``/``vit_tiny`` for ``image_size`` (multiple of 16).

    ``checkpoint`` is a path to the official file, checked against its published sha256,
    or None for random weights.
    """
    spec = VIT_SPECS[name]
    size = image_size or spec.default_image_size
    if size % PATCH_SIZE:
        raise ValueError(f"{name}: image_size must be a multiple of {PATCH_SIZE}, got {size}")
    grid = size // PATCH_SIZE
    # Read (and hash-check) the file before building: a wrong file fails in seconds, not after ViT-H.
    state = None if checkpoint is None else read_state_dict(checkpoint, expected_sha256=spec.sha256)
    encoder = ImageEncoderViT(
        img_size=size, patch_size=PATCH_SIZE, embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads,
        mlp_ratio=4, out_chans=spec.prompt_dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True, window_size=spec.window_size, global_attn_indexes=spec.global_attn_indexes,
    )
    backbone = SamBackbone(
        name=name,
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(embed_dim=spec.prompt_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(size, size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=spec.prompt_dim, mlp_dim=spec.decoder_mlp_dim,
                                          num_heads=spec.decoder_heads),
            transformer_dim=spec.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=spec.prompt_dim,
        ),
        image_size=size, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD,
    )
    if state is not None:
        state = resize_position_tables(state, backbone.state_dict())
        load_state_dict_strict(backbone, state, checkpoint, f"SAM {name} at {size} px")
    return backbone


def resize_position_tables(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Interpolate ``pos_embed`` ``[1, H, W, C]`` and ``rel_pos_h/w`` ``[2L-1, C]`` to the target shapes.

    Other entries are returned unchanged (a shape mismatch there is reported by the loader).
    """
    out = dict(state)
    for key, value in state.items():
        want = target.get(key)
        if want is None or want.shape == value.shape:
            continue
        if key.endswith("pos_embed") and value.ndim == 4:
            grid = F.interpolate(value.permute(0, 3, 1, 2).float(), size=want.shape[1:3], mode="bicubic",
                                 align_corners=False)
            out[key] = grid.permute(0, 2, 3, 1).to(value.dtype)
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and value.ndim == 2 and value.shape[1] == want.shape[1]:
            table = F.interpolate(value.t()[None].float(), size=want.shape[0], mode="linear", align_corners=False)
            out[key] = table[0].t().to(value.dtype)
    return out
