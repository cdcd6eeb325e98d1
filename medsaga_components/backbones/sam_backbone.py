"""The three parts every SAM variant shares, with input normalisation."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .._segment_anything import MaskDecoder, PromptEncoder


class SamBackbone(nn.Module):
    """An image encoder, SAM's prompt encoder and SAM's mask decoder.

    Images enter in ``[0, 1]`` (the data pipeline's scale) and are normalised with
    ``pixel_mean``/``pixel_std`` given on that scale, so SAM ViTs (ImageNet statistics) and
    LiteMedSAM (trained on min-max scaled images, mean 0 std 1) share one input convention.

    Args:
        name: registry name, kept for reports and checkpoints.
        image_encoder: ``[B, 3, S, S] -> [B, 256, S/p, S/p]``.
        prompt_encoder, mask_decoder: segment-anything modules sized for ``image_size``.
        image_size: S, the side the encoder expects.
        pixel_mean, pixel_std: per-channel statistics on the ``[0, 1]`` scale.
    """

    def __init__(self, name: str, image_encoder: nn.Module, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder,
                 image_size: int, pixel_mean: Sequence[float], pixel_std: Sequence[float]) -> None:
        super().__init__()
        self.name = name
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = image_size
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 1 or 3, S, S]`` in ``[0, 1]`` -> image embeddings ``[B, 256, S/p, S/p]``."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.image_encoder((images - self.pixel_mean) / self.pixel_std)

    @torch.no_grad()
    def predict_with_boxes(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """SAM's own single-mask prediction, as pretrained: the zero-shot reference.

        Args:
            images: ``[B, 1 or 3, S, S]`` in ``[0, 1]``.
            boxes: ``[B, 4]`` as ``x0, y0, x1, y1`` in pixels of the ``S x S`` input.
        Returns:
            mask logits ``[B, 1, S, S]``.
        """
        embeddings = self.embed_images(images)
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes[:, None, :].float(), masks=None)
        low_res, _ = self.mask_decoder(
            image_embeddings=embeddings, image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
        )
        return nn.functional.interpolate(low_res, size=images.shape[-2:], mode="bilinear", align_corners=False)
