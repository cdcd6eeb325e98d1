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
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes.float(), masks=None)
        low_res = self.decode_masks(embeddings, sparse, dense.expand(len(boxes), -1, -1, -1))[:, :1]
        return nn.functional.interpolate(low_res, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def decode_masks(self, image_embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Run the mask decoder on aligned batches: one image embedding per query.

        segment-anything's ``MaskDecoder.predict_masks`` repeats the embedding of a single
        image for every prompt; training needs B images with B prompt sets, so this runs
        the same computation with the batch already aligned.

        Args:
            image_embeddings: ``[N, D, h, w]``; sparse: ``[N, T, D]``; dense: ``[N, D, h, w]``.
        Returns:
            mask logits ``[N, num_mask_tokens, 4h, 4w]``.
        """
        decoder = self.mask_decoder
        n = image_embeddings.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
        src = image_embeddings + dense
        pos = self.prompt_encoder.get_dense_pe().expand(n, -1, -1, -1)
        _, c, h, w = src.shape
        hs, src = decoder.transformer(src, pos, tokens)
        mask_tokens_out = hs[:, 1:1 + decoder.num_mask_tokens]
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))
        hyper = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1)
        _, c2, h2, w2 = upscaled.shape
        return (hyper @ upscaled.view(n, c2, h2 * w2)).view(n, -1, h2, w2)
