"""MCP-MedSAM's prompts: a box per class, plus a modality prompt and a content prompt.

One query per class (``per_class``), each decoded by SAM's single-mask token from:

* sparse tokens ``[B, Q, T, D]``: the box's two corner tokens (SAM's prompt encoder), a
  learned **class token** per class and, with the modality prompt on, the learned
  **modality token** of the image's modality (``prompts["modality"]``);
* a dense prompt ``[B, Q, D, h, w]``: SAM's no-mask embedding plus, with the content prompt
  on, the **content features** of the box crop: the image inside the box, resampled to
  ``crop_size`` squared, through a small convolutional encoder, and placed back over the
  box's cells of the embedding grid (zero outside the box).

The class token is this project's addition to the paper. MCP-MedSAM segments one object per
box; here one box is asked per class of a dataset, and on the demo the grey-matter box is
nearly the white-matter box: the box alone cannot say which class it asks for, and box-free
inference (a first pass with the whole image as every class's box) needs the class to be
named some other way.

Starting points: class and modality tokens are drawn like SAM's own learned prompt tokens
(``nn.Embedding``'s N(0, 1)); the content encoder's last layer starts at zero, so the dense
prompt starts as LiteMedSAM's no-mask embedding and training grows the content part.

Which prompts a model was trained with is saved with its weights (the buffers
``use_modality``, ``use_content``): a model trained without the modality prompt ignores
one given at inference, whatever the switches of the network it is loaded into.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medsaga_components.config_values import as_bool
from medsaga_components.modalities import MODALITIES, check_modalities, modality_index
from medsaga_components.prompts.kinds import PromptEmbeddings, PromptKind

# Corner coordinates may reach the frame's far edge (exclusive maxima); anything further is outside.
EDGE_TOLERANCE = 1.0


def check_boxes(boxes: torch.Tensor, present: torch.Tensor | None, size: tuple[int, int]) -> None:
    """Refuse boxes (of present classes) that are not finite, leave the ``size`` (H, W) frame
    or have their corners reversed, naming the first offending box."""
    height, width = size
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"prompts['boxes'] must be [B, Q, 4] (x0, y0, x1, y1), got {tuple(boxes.shape)}")
    asked = torch.ones(boxes.shape[:2], dtype=torch.bool, device=boxes.device) if present is None \
        else present.to(device=boxes.device, dtype=torch.bool)
    x0, y0, x1, y1 = boxes.unbind(-1)
    problems = [
        (~torch.isfinite(boxes).all(-1), "is not finite"),
        ((x0 < 0) | (y0 < 0) | (x1 > width - 1 + EDGE_TOLERANCE) | (y1 > height - 1 + EDGE_TOLERANCE),
         f"lies outside the {width} x {height} image (x in 0..{width - 1}, y in 0..{height - 1})"),
        ((x1 < x0) | (y1 < y0), "has x1 < x0 or y1 < y0 (expected x0, y0, x1, y1)"),
    ]
    for bad, why in problems:
        bad = bad & asked
        if bool(bad.any()):
            b, q = torch.nonzero(bad)[0].tolist()
            raise ValueError(f"box {boxes[b, q].tolist()} at prompts['boxes'][{b}, {q}] (class {q + 1}) {why}")


class ContentEncoder(nn.Module):
    """``[M, 1, c, c]`` box crops -> ``[M, D, c/8, c/8]`` content features (three stride-2
    convolutions, then a 1x1 projection to the prompt dimension that starts at zero)."""

    def __init__(self, embed_dim: int, channels: int = 32) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, channels // 2, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.GELU(),
        )
        self.projection = nn.Conv2d(2 * channels, embed_dim, 1)
        nn.init.zeros_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.projection(self.layers(crops))


def _pixel_to_unit(coordinate: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel-centre coordinate -> grid_sample's [-1, 1] (align_corners=False convention)."""
    return (2 * coordinate + 1) / size - 1


def crop_boxes(image: torch.Tensor, boxes: torch.Tensor, crop_size: int) -> torch.Tensor:
    """``[B, C, S, S]`` image, ``[B, Q, 4]`` boxes (pixels) -> ``[B * Q, 1, c, c]`` grey crops,
    bilinear, the box's corner pixels at the crop's corners."""
    b, q, _ = boxes.shape
    grey = image.float().mean(dim=1, keepdim=True)
    h, w = grey.shape[-2:]
    x0, y0, x1, y1 = _pixel_to_unit(boxes[..., 0], w), _pixel_to_unit(boxes[..., 1], h), \
        _pixel_to_unit(boxes[..., 2], w), _pixel_to_unit(boxes[..., 3], h)
    theta = torch.zeros(b * q, 2, 3, dtype=grey.dtype, device=grey.device)
    theta[:, 0, 0] = ((x1 - x0) / 2).reshape(-1)
    theta[:, 0, 2] = ((x1 + x0) / 2).reshape(-1)
    theta[:, 1, 1] = ((y1 - y0) / 2).reshape(-1)
    theta[:, 1, 2] = ((y1 + y0) / 2).reshape(-1)
    grid = F.affine_grid(theta, [b * q, 1, crop_size, crop_size], align_corners=True)
    return F.grid_sample(grey.repeat_interleave(q, dim=0), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def paste_into_boxes(features: torch.Tensor, boxes: torch.Tensor, grid_size: tuple[int, int],
                     image_size: tuple[int, int]) -> torch.Tensor:
    """``[B * Q, D, f, f]`` crop features -> ``[B * Q, D, h, w]`` on the embedding grid: each
    grid cell whose centre lies in its box samples the features there (bilinear), others are 0."""
    m = features.shape[0]
    (h, w), (height, width) = grid_size, image_size
    flat = boxes.reshape(m, 4).to(features.dtype)
    ys = (torch.arange(h, device=features.device, dtype=features.dtype) + 0.5) * height / h - 0.5
    xs = (torch.arange(w, device=features.device, dtype=features.dtype) + 0.5) * width / w - 0.5
    span_x = (flat[:, 2] - flat[:, 0]).clamp(min=1.0)
    span_y = (flat[:, 3] - flat[:, 1]).clamp(min=1.0)
    u = 2 * (xs[None, :] - flat[:, :1]) / span_x[:, None] - 1  # [M, w]: -1 at x0, +1 at x1
    v = 2 * (ys[None, :] - flat[:, 1:2]) / span_y[:, None] - 1  # [M, h]
    grid = torch.stack([u[:, None, :].expand(m, h, w), v[:, :, None].expand(m, h, w)], dim=-1)
    inside = (grid.abs() <= 1).all(dim=-1)[:, None]  # [M, 1, h, w]; bilinear sampling alone bleeds past the edge
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=True) * inside


class McpPrompt(PromptKind):
    """Box + class + modality + content prompts, one query per class (see the module docstring).

    ``prompts``: ``"boxes"`` ``[B, N, 4]`` (x0, y0, x1, y1 in pixels of the network's input
    frame, required); ``"modality"``: ``[B]`` indices into ``modalities``, a list of ``B``
    names or one name for the batch (none given: the ``default_modality``; without one, the
    queries are decoded without a modality token, as with the modality prompt off); ``"present"`` ``[B, N]`` (optional, see ``network.py``);
    ``"image"`` is put in by ``SamSegmenter`` (``needs_image``).

    Args:
        num_classes: N; embed_dim: D, the prompt encoder's.
        modalities: the modality vocabulary (``modalities.MODALITIES`` by default); one
            learned token each.
        modality_prompt, content_prompt: the paper's two prompts, each switchable (saved with
            the weights).
        default_modality: the modality assumed when a call gives none (a bundle sets it from
            dataset.json; saved with the weights, so a served model knows the modality it was
            trained for).
        crop_size: side of the box crop the content encoder reads (MCP-MedSAM: 64).
    """

    per_class = True
    user_input = "boxes"
    needs_image = True
    required_keys = ("boxes",)

    def __init__(self, num_classes: int, embed_dim: int, modalities: Sequence[str] | None = None,
                 modality_prompt: bool = True, content_prompt: bool = True, default_modality: str | None = None,
                 crop_size: int = 64) -> None:
        super().__init__(num_classes, embed_dim)
        self.modalities = check_modalities(MODALITIES if modalities is None else modalities)
        if crop_size < 8 or crop_size % 8:
            raise ValueError(f"crop_size must be a positive multiple of 8, got {crop_size}")
        self.crop_size = int(crop_size)
        self.class_tokens = nn.Parameter(torch.randn(num_classes, embed_dim))
        self.modality_tokens = nn.Embedding(len(self.modalities), embed_dim)
        self.content_encoder = ContentEncoder(embed_dim)
        self.register_buffer("use_modality", torch.tensor(as_bool(modality_prompt, "modality_prompt")))
        self.register_buffer("use_content", torch.tensor(as_bool(content_prompt, "content_prompt")))
        # -1: none; a served model keeps the default of the data it was trained on.
        self.register_buffer("default_modality", torch.tensor(-1 if default_modality is None else modality_index(
            default_modality, self.modalities, where="default_modality")))

    def check(self, prompts):
        prompts = prompts or {}
        if prompts.get("boxes") is None:
            raise ValueError(f"{type(self).__name__} needs prompt keys ['boxes'] (box-prompted inference: one box "
                             "[B, N, 4] per class, x0, y0, x1, y1 pixels); got none. Without boxes, use "
                             "engine.TwoPassBoxSegmenter or TwoPassInferer (box-free, two passes)")
        return prompts

    def modality_indices(self, modality, batch_size: int, device: torch.device) -> torch.Tensor | None:
        """``[B]`` long indices from what ``prompts["modality"]`` may hold (None: none given and
        no default); undeclared names and out-of-range indices are errors that name them."""
        if modality is None:
            if int(self.default_modality) < 0:
                return None
            modality = int(self.default_modality)
        if isinstance(modality, str):
            modality = [modality] * batch_size
        if isinstance(modality, (list, tuple)):
            modality = [modality_index(m, self.modalities, where="prompts['modality']") if isinstance(m, str)
                        else int(m) for m in modality]
        indices = torch.as_tensor(modality, dtype=torch.long, device=device).reshape(-1)
        if indices.numel() == 1:
            indices = indices.expand(batch_size)
        if indices.numel() != batch_size:
            raise ValueError(f"prompts['modality'] gives {indices.numel()} modalities for {batch_size} images")
        bad = (indices < 0) | (indices >= len(self.modalities))
        if bool(bad.any()):
            raise ValueError(f"modality index {int(indices[bad][0])} is not declared; expected 0.."
                             f"{len(self.modalities) - 1} for {list(self.modalities)}")
        return indices

    def forward(self, prompt_encoder, batch_size, prompts):
        prompts = self.check(prompts)
        boxes = prompts["boxes"].float()
        if boxes.ndim != 3 or boxes.shape[0] != batch_size or boxes.shape[1] != self.num_classes:
            raise ValueError(f"prompts['boxes'] must be [B, N, 4] = [{batch_size}, {self.num_classes}, 4] "
                             f"(one box per class), got {tuple(boxes.shape)}")
        check_boxes(boxes, prompts.get("present"), prompt_encoder.input_image_size)
        b, q, _ = boxes.shape
        corners, dense = prompt_encoder(points=None, boxes=boxes.reshape(b * q, 4), masks=None)  # [BQ, 2, D]
        tokens = [corners.view(b, q, 2, -1), self.class_tokens[None, :, None, :].expand(b, -1, -1, -1)]
        index = self.modality_indices(prompts.get("modality"), b, boxes.device)
        if bool(self.use_modality) and index is not None:
            tokens.append(self.modality_tokens(index)[:, None, None, :].expand(-1, q, -1, -1))
        sparse = torch.cat(tokens, dim=2)  # [B, Q, T, D]
        dense = dense.expand(b * q, -1, -1, -1)
        if bool(self.use_content):
            if "image" not in prompts:
                raise ValueError(f"{type(self).__name__}'s content prompt needs prompts['image'] (SamSegmenter "
                                 "puts the input image there)")
            crops = crop_boxes(prompts["image"], boxes, self.crop_size)
            content = paste_into_boxes(self.content_encoder(crops.to(dense.dtype)), boxes,
                                       tuple(dense.shape[-2:]), prompt_encoder.input_image_size)
            dense = dense + content
        return PromptEmbeddings(sparse, dense.reshape(b, q, *dense.shape[1:]))


def mcp_prompt_from_options(num_classes: int, embed_dim: int, options: Mapping | None = None) -> McpPrompt:
    """``McpPrompt`` with bundle options (``modalities``, ``modality_prompt``, ...); None values keep defaults."""
    kept = {k: v for k, v in (options or {}).items() if v is not None}
    return McpPrompt(num_classes, embed_dim, **kept)


__all__ = ["McpPrompt", "ContentEncoder", "check_boxes", "crop_boxes", "paste_into_boxes", "mcp_prompt_from_options"]
