"""SamSegmenter: SAM as a plain segmentation network, ``[B, C, H, W] -> [B, N + 1, H, W]``."""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._segment_anything import MaskDecoder
from .backbones import SamBackbone, build_backbone
from medsaga_components.prompts import PROMPT_KINDS, PromptKind


# Logit of a class whose prompt says it is absent (``prompts["present"]`` False): never predicted,
# no gradient through its query (prompts/from_labels.py explains the placeholder prompts).
ABSENT_CLASS_LOGIT = -1.0e4


class SamSegmenter(nn.Module):
    """SAM adapted to N classes, returning class logits like any MONAI segmentation network.

    Channel 0 is background. Without prompts (SAMed, MedSAGa) the mask decoder is widened to
    N + 1 mask tokens and the logits are read with softmax. With a per-class prompt kind
    (boxes, points, class tokens) each class is decoded as its own query with SAM's
    single-mask token; the background channel is then 0 so that ``argmax`` picks a class
    exactly where its sigmoid exceeds 0.5 and is highest.

    Args:
        backbone: a registry name (see ``medsaga_components.backbones``) or a built backbone.
        num_classes: N, foreground classes.
        checkpoint: ``"pretrained"``, a path or None (random), when ``backbone`` is a name.
        image_size: the side the backbone works at; inputs of another size are resized to it
            and the logits back to the input size.
        prompt: a ``PROMPT_KINDS`` name or a :class:`PromptKind` instance.
    """

    # Several boxes per class decode once per box; each training pass keeps about 1.8 GB of
    # decoder activations (batch 2, 4 classes, 256 px). The memory-efficient mode sets this
    # (``training.memory``) so that each pass is recomputed in backward instead: K passes then
    # hold about one pass's activations.
    checkpoint_box_passes = False

    def __init__(self, backbone: str | SamBackbone = "lite_medsam", num_classes: int = 1,
                 checkpoint: str | Path | None = "pretrained", image_size: int | None = None,
                 prompt: str | PromptKind = "none") -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if isinstance(backbone, str):
            backbone = build_backbone(backbone, image_size=image_size, checkpoint=checkpoint)
        self.backbone = backbone
        self.num_classes = num_classes
        embed_dim = backbone.prompt_encoder.embed_dim
        if isinstance(prompt, str):
            if prompt not in PROMPT_KINDS:
                raise ValueError(f"unknown prompt kind {prompt!r}; expected one of {sorted(PROMPT_KINDS)}")
            prompt = PROMPT_KINDS[prompt](num_classes, embed_dim)
        self.prompt = prompt
        if not prompt.per_class:
            widen_mask_decoder(backbone.mask_decoder, num_classes + 1)

    @property
    def image_size(self) -> int:
        return self.backbone.image_size

    def class_head_parameters(self) -> list[nn.Parameter]:
        """The parameters that read out the classes and start without pretrained values for
        them: the widened decoder's mask tokens, hypernetwork MLPs and IoU head (no prompts),
        or the prompt module (per-class prompts). Optimisers may give them a higher rate."""
        if self.prompt.per_class:
            return list(self.prompt.parameters())
        decoder = self.backbone.mask_decoder
        return [*decoder.mask_tokens.parameters(), *decoder.output_hypernetworks_mlps.parameters(),
                *decoder.iou_prediction_head.parameters()]

    def forward(self, image: torch.Tensor, prompts: Mapping[str, torch.Tensor] | None = None,
                embeddings: torch.Tensor | None = None, only_class: int | None = None) -> torch.Tensor:
        """Class logits for ``image``.

        Args:
            image: ``[B, 1 or 3, H, W]`` floats in ``[0, 1]``.
            prompts: inputs of the prompt kind, in pixels of the ``image_size`` frame
                (for example ``{"boxes": [B, N, 4]}``); an optional ``"present"`` ``[B, N]``
                bool marks classes absent from an image (their logits become ``ABSENT_CLASS_LOGIT``).
                Boxes ``[B, N, K, 4]`` (with ``"present"`` ``[B, N, K]``) give a class K boxes,
                one per structure: the prompts are decoded K times, box k of every class
                at a time, and a class's logit is the highest over its boxes.
            embeddings: the encoder's ``[B, D, h, w]`` for ``image`` when already computed
                (two-pass inference decodes one image twice); None runs the encoder.
            only_class: per-class kinds: decode the query of this class (0..N-1) alone, the
                others getting ``ABSENT_CLASS_LOGIT`` (propagation asks one class at a time).
        Returns:
            ``[B, N + 1, H, W]`` logits.
        """
        if image.ndim != 4 or image.shape[1] not in (1, 3):
            raise ValueError(f"expected image [B, 1 or 3, H, W], got {tuple(image.shape)}")
        size = self.image_size
        out_hw = image.shape[-2:]
        if tuple(out_hw) != (size, size):
            image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
        embeddings = self.backbone.embed_images(image) if embeddings is None else embeddings  # [B, D, h, w]
        if self.prompt.needs_image:  # content prompts read the image inside each box (prompts/mcp.py)
            prompts = {**(prompts or {}), "image": image}
        boxes = None if prompts is None else prompts.get("boxes")
        if boxes is not None and boxes.ndim == 4:  # [B, N, K, 4]: K boxes per class
            present = prompts.get("present", torch.ones(boxes.shape[:3], dtype=torch.bool, device=boxes.device))
            decode = self._decode_classes
            if self.checkpoint_box_passes and torch.is_grad_enabled():
                decode = partial(checkpoint, self._decode_classes, use_reentrant=False)
            logits = torch.stack([
                decode(embeddings, {**prompts, "boxes": boxes[:, :, k], "present": present[:, :, k]}, only_class)
                for k in range(boxes.shape[2])
            ]).amax(dim=0)
        else:
            logits = self._decode_classes(embeddings, prompts, only_class)
        return F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False)

    def _decode_classes(self, embeddings: torch.Tensor, prompts: Mapping[str, torch.Tensor] | None,
                        only_class: int | None = None) -> torch.Tensor:
        """``[B, N + 1, h', w']`` logits at the decoder's resolution from the encoder's ``[B, D, h, w]``."""
        b = embeddings.shape[0]
        prompt_encoder = self.backbone.prompt_encoder
        sparse, dense = self.prompt(prompt_encoder, b, prompts)  # [B, Q, T, D], [B, Q, D, h, w]
        q = sparse.shape[1]
        if self.prompt.per_class and q != self.num_classes:
            raise ValueError(f"per-class prompts need one query per class ({self.num_classes}), got {q}")
        if only_class is not None:
            if not self.prompt.per_class or not 0 <= only_class < q:
                raise ValueError(f"only_class {only_class}: needs a per-class prompt kind and 0..{q - 1}")
            sparse, dense = sparse[:, only_class:only_class + 1], dense[:, only_class:only_class + 1]
        asked = sparse.shape[1]
        masks = self.backbone.decode_masks(
            embeddings.repeat_interleave(asked, dim=0),
            sparse.reshape(b * asked, *sparse.shape[2:]),
            dense.reshape(b * asked, *dense.shape[2:]),
        )  # [B * Q, M, h', w']
        if self.prompt.per_class:
            foreground = masks[:, :1].reshape(b, asked, *masks.shape[-2:])
            if only_class is not None:  # the other classes are not asked
                full = foreground.new_full((b, q, *masks.shape[-2:]), ABSENT_CLASS_LOGIT)
                full[:, only_class:only_class + 1] = foreground
                foreground = full
            foreground = self.prompt.class_logits(foreground)
            if prompts is not None and "present" in prompts:  # a class without a prompt in this image
                absent = ~prompts["present"].to(device=foreground.device, dtype=torch.bool)
                foreground = foreground.masked_fill(absent[:, :, None, None], ABSENT_CLASS_LOGIT)
            return torch.cat([torch.zeros_like(foreground[:, :1]), foreground], dim=1)
        return masks


def widen_mask_decoder(decoder: MaskDecoder, num_masks: int) -> None:
    """Give ``decoder`` ``num_masks`` mask tokens (SAMed's N + 1 class masks), in place.

    New tokens, hypernetwork MLPs and IoU-head rows are copied cyclically from the
    pretrained ones (token i from token i mod 4) instead of starting random, so that few-shot
    training begins from pretrained mask heads; the class targets break the symmetry.
    """
    old = decoder.num_mask_tokens
    if num_masks == old:
        return
    dim = decoder.mask_tokens.weight.shape[1]
    source = [i % old for i in range(num_masks)]
    tokens = nn.Embedding(num_masks, dim)
    tokens.weight.data.copy_(decoder.mask_tokens.weight.data[source])
    decoder.mask_tokens = tokens
    decoder.output_hypernetworks_mlps = nn.ModuleList(copy.deepcopy(decoder.output_hypernetworks_mlps[i]) for i in source)
    last = decoder.iou_prediction_head.layers[-1]
    head = nn.Linear(last.in_features, num_masks)
    head.weight.data.copy_(last.weight.data[source])
    head.bias.data.copy_(last.bias.data[source])
    decoder.iou_prediction_head.layers[-1] = head
    decoder.num_mask_tokens = num_masks
    decoder.num_multimask_outputs = num_masks - 1
    reset_mask_readout(decoder)


def reset_mask_readout(decoder: MaskDecoder) -> None:
    """Zero the last layer of every hypernetwork MLP of ``decoder``, in place: every mask then
    starts at logit 0 on every pixel.

    SAM's pretrained heads emit saturated object logits (about -30 to +5); copied into class
    heads they make every pixel one class, and the first steps of few-shot training are spent
    only on moving that bias. From zero, with the pretrained tokens and hidden layers kept,
    training begins by learning a per-class linear read-out of SAM's mask features, which
    takes few steps.
    """
    for mlp in decoder.output_hypernetworks_mlps:
        nn.init.zeros_(mlp.layers[-1].weight)
        nn.init.zeros_(mlp.layers[-1].bias)
