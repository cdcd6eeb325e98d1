"""Adaptation methods by name: which parameters train, with which optimiser and loss.

| method | encoder | also trained | optimiser | loss |
|---|---|---|---|---|
| ``full`` | everything | everything | AdamW | 0.2 CE + 0.8 Dice |
| ``medsaga`` | GaLore on attention/MLP weights, rest frozen | prompt encoder, mask decoder | GaLoreAdamW + AdamW | 0.2 CE + 0.8 Dice |
| ``samed`` | frozen + LoRA r=4 on q, v | prompt encoder, mask decoder | AdamW | 0.2 CE + 0.8 Dice |
| ``ssam`` | frozen + SVD scale/shift | norms, pos_embed, class-prompt tokens | AdamW | focal + Dice (sigmoid) |

Bundles and the benchmark both build their networks and optimisers through here, so the
methods they compare are the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from monai.losses import DiceCELoss, DiceFocalLoss
from torch import nn

from .adapters import LoraConfig, SvdConfig, inject_lora, inject_svd, mark_only_lora_trainable
from .adapters.galore import GaloreConfig, build_galore_optimizer
from .backbones.checkpoints import load_state_dict_strict, read_state_dict
from .backbones import build_backbone
from .network import SamSegmenter
from .prompts import ClassTokenPrompt, PromptKind, name_keyed_embeddings


@dataclass(frozen=True)
class Method:
    """Defaults of one method; ``lr`` and ``weight_decay`` can be overridden per run."""

    name: str
    prompt: str = "none"
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_iterations: int = 0
    options: dict = field(default_factory=dict)


METHODS = {
    "full": Method("full", lr=2e-4),
    "medsaga": Method("medsaga", lr=2e-4),
    "samed": Method("samed", lr=5e-3, weight_decay=0.1, warmup_iterations=250),
    "ssam": Method("ssam", prompt="class_tokens", lr=1e-4),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


def build_network(method: str, backbone: str = "lite_medsam", num_classes: int = 1,
                  checkpoint: str | None = "pretrained", image_size: int | None = None,
                  weights: str | None = None, class_names: Sequence[str] | None = None,
                  class_embeddings: str | None = None, decompose: bool = True) -> SamSegmenter:
    """The method's network: the backbone with the method's prompt kind and adapters injected.

    Args:
        weights: a plain ``model.pt`` (as the bundles export) loaded before the adapters are
            injected, to fine-tune a previously trained model.
        class_names, class_embeddings: for class-token prompts (S-SAM), the tokens start from
            the embeddings in the file ``class_embeddings`` (a ``[N, E]`` tensor saved with
            torch.save, e.g. from a text encoder) or else from embeddings keyed by the names.
        decompose: S-SAM computes each weight's SVD when injected; False leaves the factors
            empty, to be filled by ``load_state_dict`` (or to count parameters quickly).
    """
    spec = get_method(method)
    sam = build_backbone(backbone, image_size=image_size, checkpoint=checkpoint)
    prompt: str | PromptKind = spec.prompt
    if spec.prompt == "class_tokens":
        dim = sam.prompt_encoder.embed_dim
        if class_embeddings:
            start = torch.load(class_embeddings, map_location="cpu", weights_only=True)
        elif class_names:
            if len(class_names) != num_classes:
                raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes")
            start = name_keyed_embeddings(class_names, dim)
        else:
            start = None
        prompt = ClassTokenPrompt(num_classes, dim, class_embeddings=start)
    network = SamSegmenter(sam, num_classes=num_classes, prompt=prompt)
    if weights:
        state = read_state_dict(weights)
        load_state_dict_strict(network, state, weights, f"{method} network ({backbone}, {num_classes} classes)")
    if method == "samed":
        inject_lora(network.backbone, LoraConfig(rank=4, target_modules=("qkv",), qkv_parts=("q", "v")))
        mark_only_lora_trainable(network, ("backbone.prompt_encoder", "backbone.mask_decoder"))
    elif method == "ssam":
        inject_svd(network.backbone, SvdConfig(), decompose=decompose)
        _mark_ssam_trainable(network)
    return network


def _mark_ssam_trainable(network: SamSegmenter) -> None:
    """S-SAM trains the singular-value scale/shift, normalisation layers, the position embedding
    and the class prompts; everything else (the pretrained weights) stays frozen."""
    norm_types = (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)
    for name, module in network.named_modules():
        own = list(module.named_parameters(recurse=False))
        is_norm = isinstance(module, norm_types) or type(module).__name__ == "LayerNorm2d"
        for pname, p in own:
            p.requires_grad_(is_norm or pname in ("scale", "shift", "pos_embed") or name.startswith("prompt"))


def build_optimizer(method: str, network: nn.Module, lr: float | None = None, weight_decay: float | None = None,
                    galore: GaloreConfig | None = None, head_lr: float | None = None) -> torch.optim.Optimizer:
    """The method's optimiser over the parameters its network leaves trainable.

    ``head_lr``: the rate of the class read-out (``SamSegmenter.class_head_parameters``), which
    starts from zero-initialised heads and has to move further than the pretrained weights;
    None: ``lr`` for everything.
    """
    spec = get_method(method)
    lr = spec.lr if lr is None else lr
    weight_decay = spec.weight_decay if weight_decay is None else weight_decay
    if method == "medsaga":
        optimizer = build_galore_optimizer(network, galore or GaloreConfig(), lr=lr, weight_decay=weight_decay)
    else:
        params = [p for p in network.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if head_lr is not None:
        _move_to_own_group(optimizer, network.class_head_parameters(), lr=head_lr)
    return optimizer


def _move_to_own_group(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], **settings) -> None:
    """Take ``params`` out of the optimiser's first group into a new group with ``settings``
    (before the first step). Both optimisers above keep every parameter outside GaLore's rank
    groups in their first group."""
    moving = {id(p) for p in params}
    plain = optimizer.param_groups[0]
    taken = [p for p in plain["params"] if id(p) in moving]
    plain["params"] = [p for p in plain["params"] if id(p) not in moving]
    optimizer.add_param_group({**{k: v for k, v in plain.items() if k != "params"}, **settings, "params": taken})


def build_loss(method: str) -> nn.Module:
    """Loss on ``[B, N+1, H, W]`` logits and ``[B, 1, H, W]`` class-index labels."""
    if get_method(method).prompt == "none":
        return DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.2, lambda_dice=0.8)
    # Per-class queries: each foreground channel is its own sigmoid mask (background is 0).
    return DiceFocalLoss(to_onehot_y=True, sigmoid=True, include_background=False)
