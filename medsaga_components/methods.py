"""Adaptation methods by name: one :class:`Method` object declares everything that makes a
method that method (prompt kind, adapters, what trains, optimiser groups and their rates,
schedule, loss). Bundles, baselines and the benchmark build through here, with the same
defaults, so the methods they compare are the same.

| method | prompt | encoder | also trained | optimiser | loss |
|---|---|---|---|---|---|
| ``full`` | none | everything | everything | AdamW | 0.2 CE + 0.8 Dice |
| ``medsaga`` | none | GaLore on attention/MLP weights, rest frozen | prompt encoder, mask decoder | GaLoreAdamW | 0.2 CE + 0.8 Dice (Dice over the classes, not the background) |
| ``samed`` | none | frozen + LoRA r=4 on q, v | prompt encoder, mask decoder | AdamW | 0.2 CE + 0.8 Dice |
| ``ssam`` | class tokens | frozen + SVD scale/shift | norms, pos_embed, class-token prompts, mask decoder | AdamW | 0.2 CE + 0.8 Dice (softmax over the classes' queries) |
| ``cheap_lunch`` | points + class tokens | frozen + LoRA r=4 on q, v | prompt encoder, mask decoder (the paper: LoRA r=4 on its q/v projections) | AdamW | CE + 0.8 Dice |
| ``mcp_medsam`` | box + class, modality, content prompts | everything | everything | AdamW | Dice + BCE (sigmoid) |

Rates are for few-shot runs of up to 300 steps (the bundles' train-until-plateau schedule). The papers'
own settings are documented overrides in each bundle's ``docs/README.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from monai.losses import DiceCELoss, DiceFocalLoss
from torch import nn

from .adapters import LoraConfig, SvdConfig, adapter_parameters, inject_lora, inject_svd, mark_trainable
from .adapters.base import has_prefix
from .backbones import build_backbone
from medsaga_components.io.checkpoints import load_checkpoint, load_state_dict_strict, read_state_dict
from medsaga_components.optimizers.schedules import warmup_poly_scheduler
from .losses import DiceBceLoss
from .network import SamSegmenter, reset_mask_readout
from .optimizers.galore import GaloreConfig, galore_adamw, galore_rank_groups, galore_target_weights
from medsaga_components.prompts import PROMPT_KINDS, ClassTokenPrompt, PromptKind, name_keyed_embeddings

ENCODER = "backbone.image_encoder"
DECODER_AND_PROMPTS = ("prompt", "backbone.prompt_encoder", "backbone.mask_decoder")
NORM_TYPES = (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)
LOSSES = ("dice_ce", "dice_focal", "dice_bce")
READOUTS = ("pretrained", "zero")
ENCODER_QV_LORA = ((LoraConfig(rank=4, target_modules=("qkv",), qkv_parts=("q", "v")), "image_encoder"),)
# Cheap Lunch's paper setting (``--method_def#lora`` / ``--method_def#trained_in_full``): LoRA also
# on the mask decoder's two-way transformer, only its mask head and the prompt encoder in full.
CHEAP_LUNCH_PAPER_LORA = (*ENCODER_QV_LORA,
                          (LoraConfig(rank=4, target_modules=("q_proj", "v_proj"), qkv_parts=None), "mask_decoder"))
CHEAP_LUNCH_PAPER_TRAINED_IN_FULL = ("backbone.prompt_encoder", "backbone.mask_decoder.iou_token",
                                     "backbone.mask_decoder.mask_tokens", "backbone.mask_decoder.output_upscaling",
                                     "backbone.mask_decoder.output_hypernetworks_mlps")


@dataclass(frozen=True)
class Method:
    """Everything that makes one adaptation method.

    Args:
        name: registry name.
        prompt: a ``PROMPT_KINDS`` name.
        lora: ``(LoraConfig, root)`` pairs injected into the backbone (root: ``"image_encoder"``,
            ``"mask_decoder"``).
        svd: S-SAM's singular-value adapters on the encoder, or None.
        galore: GaLore rank groups for the encoder's attention/MLP weights (GaLoreAdamW), or
            None (AdamW). Those weights then train in full size through a rank-r optimiser state.
        trained_in_full: dotted-name prefixes of ``SamSegmenter`` trained in full.
        train_norms: also train every normalisation layer (S-SAM).
        train_position_embedding: also train the encoder's ``pos_embed`` (S-SAM).
        lr: AdamW rate of what trains in full.
        adapter_lr: rate of the adapters' own parameters (LoRA A/B, SVD scale/shift); None: ``lr``.
        head_lr: rate of the class read-out (``SamSegmenter.class_head_parameters``), which starts
            without pretrained values for the classes; None: ``lr``.
        weight_decay: AdamW's, for every group.
        warmup_iterations, poly_power: linear warmup, then ``(1 - t)^power`` decay, per step.
        loss: ``"dice_ce"`` (0.2 CE + 0.8 Dice, softmax), ``"dice_focal"`` (sigmoid per class) or
            ``"dice_bce"`` (Dice + BCE per class, MCP-MedSAM's).
        ce_weight: the CE weight of ``"dice_ce"`` (Cheap Lunch's loss is CE + 0.8 Dice: 1.0).
        dice_background: whether ``"dice_ce"``'s Dice term also scores the background channel.
            medsaga turns it off (nnU-Net's choice): on small structures the background, 99 %
            of the pixels, scores near 1 from the first step and dilutes the classes' Dice
            gradient (N + 1)-fold. The other methods keep it on, as they were measured.
        readout: ``"pretrained"`` keeps the decoder's mask read-out (the last layer of its
            hypernetwork MLPs); ``"zero"`` starts it at zero (``network.reset_mask_readout``
            says why), for per-class queries SAM was never trained to answer (class tokens,
            LiteMedSAM's clicks). The widened decoder always starts from zero.
    """

    name: str
    prompt: str = "none"
    lora: tuple[tuple[LoraConfig, str], ...] = ()
    svd: SvdConfig | None = None
    galore: GaloreConfig | None = None
    trained_in_full: tuple[str, ...] = DECODER_AND_PROMPTS
    train_norms: bool = False
    train_position_embedding: bool = False
    lr: float = 2e-4
    adapter_lr: float | None = None
    head_lr: float | None = 2e-3
    weight_decay: float = 0.01
    warmup_iterations: int = 8
    poly_power: float = 0.9
    loss: str = "dice_ce"
    ce_weight: float = 0.2
    dice_background: bool = True
    readout: str = "pretrained"

    def __post_init__(self) -> None:
        if self.prompt not in PROMPT_KINDS:
            raise ValueError(f"method {self.name!r}: unknown prompt kind {self.prompt!r}; expected one of "
                             f"{sorted(PROMPT_KINDS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"method {self.name!r}: unknown loss {self.loss!r}; expected one of {LOSSES}")
        if self.readout not in READOUTS:
            raise ValueError(f"method {self.name!r}: unknown readout {self.readout!r}; expected one of {READOUTS}")

    # --- overrides ---------------------------------------------------------------------------

    def with_overrides(self, **overrides: Any) -> Method:
        """A copy with the given settings changed; None values keep the method's default.

        Besides the field names above: ``rank`` (the LoRA rank, or GaLore's), and GaLore's
        ``update_proj_gap``, ``galore_scale`` and ``galore_lr``. A setting the method does not
        have (a GaLore setting for LoRA) is an error, not silently ignored.
        """
        changes = {k: v for k, v in overrides.items() if v is not None}
        galore_keys = {"update_proj_gap": "update_proj_gap", "galore_scale": "scale", "galore_lr": "lr"}
        galore_changes = {galore_keys[k]: changes.pop(k) for k in list(changes) if k in galore_keys}
        rank = changes.pop("rank", None)
        if rank is not None:
            if self.galore is not None:
                galore_changes["rank"] = int(rank)
            elif self.lora:
                changes["lora"] = tuple((dataclasses.replace(c, rank=int(rank)), root) for c, root in self.lora)
            else:
                raise ValueError(f"method {self.name!r} has no rank to set (only LoRA and GaLore methods do)")
        if galore_changes:
            if self.galore is None:
                raise ValueError(f"method {self.name!r} does not use GaLore: {sorted(galore_changes)} do not apply")
            changes["galore"] = dataclasses.replace(self.galore, **galore_changes)
        settable = {f.name for f in dataclasses.fields(self)} - {"name"}
        unknown = sorted(set(changes) - settable)
        if unknown:
            raise ValueError(f"unknown settings {unknown} for method {self.name!r}; expected some of "
                             f"{sorted(settable | {'rank', *galore_keys})}")
        if "trained_in_full" in changes:  # a JSON list from a bundle override
            changes["trained_in_full"] = tuple(changes["trained_in_full"])
        return dataclasses.replace(self, **changes)

    # --- network ---------------------------------------------------------------------------

    def build_prompt(self, num_classes: int, embed_dim: int, class_names: Sequence[str] | None = None,
                     class_embeddings: str | None = None, prompt_options: dict | None = None) -> PromptKind:
        """The prompt module. Class tokens start from the ``[N, E]`` tensor in the file
        ``class_embeddings`` (e.g. a text encoder's), or from embeddings keyed by the names.
        ``prompt_options``: keyword arguments of the prompt kind (None values keep its defaults)."""
        if self.prompt != "class_tokens":
            if class_embeddings:
                raise ValueError(f"class_embeddings apply to class-token methods, not to {self.name!r}")
            options = {k: v for k, v in (prompt_options or {}).items() if v is not None}
            return PROMPT_KINDS[self.prompt](num_classes, embed_dim, **options)
        start = None
        if class_embeddings:
            start = load_checkpoint(class_embeddings, "class embeddings")
        elif class_names:
            if len(class_names) != num_classes:
                raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes")
            start = name_keyed_embeddings(class_names, embed_dim)
        return ClassTokenPrompt(num_classes, embed_dim, class_embeddings=start)

    def inject_adapters(self, network: SamSegmenter, decompose: bool = True) -> None:
        """Put the method's adapters into ``network.backbone``, in place."""
        for config, root in self.lora:
            inject_lora(network.backbone, config, root)
        if self.svd is not None:
            inject_svd(network.backbone, self.svd, decompose=decompose)

    def mark_trainable(self, network: SamSegmenter) -> list[str]:
        """``requires_grad`` on exactly what this method trains; returns those names."""
        adapters = set(adapter_parameters(network))
        projected = {id(p) for p in self._galore_weights(network)}

        def keep(name: str, param: nn.Parameter) -> bool:
            owner_name, _, own_name = name.rpartition(".")
            return (name in adapters or id(param) in projected or has_prefix(name, self.trained_in_full)
                    or (self.train_position_embedding and own_name == "pos_embed")
                    or (self.train_norms and _is_norm(network.get_submodule(owner_name))))

        return mark_trainable(network, keep)

    def _galore_weights(self, network: nn.Module) -> list[nn.Parameter]:
        if self.galore is None:
            return []
        return list(galore_target_weights(network.get_submodule(ENCODER), self.galore).values())

    # --- optimisation ----------------------------------------------------------------------

    def optimizer_groups(self, network: SamSegmenter) -> list[dict]:
        """Parameter groups over exactly the trainable parameters, each with its rate and a
        ``name``: ``trained_in_full``, ``adapters``, ``class_head``, then GaLore's rank groups."""
        trainable = [p for p in network.parameters() if p.requires_grad]
        heads = {id(p) for p in network.class_head_parameters()}
        adapters = {id(p) for p in adapter_parameters(network).values()}
        projected = [p for p in self._galore_weights(network) if p.requires_grad]
        projected_ids = {id(p) for p in projected}
        buckets: dict[str, list[nn.Parameter]] = {"trained_in_full": [], "adapters": [], "class_head": []}
        for p in trainable:
            if id(p) in projected_ids:
                continue
            buckets["class_head" if id(p) in heads else "adapters" if id(p) in adapters else "trained_in_full"].append(p)
        rates = {"trained_in_full": self.lr, "adapters": _or(self.adapter_lr, self.lr),
                 "class_head": _or(self.head_lr, self.lr)}
        groups = [{"name": name, "params": params, "lr": rates[name], "weight_decay": self.weight_decay}
                  for name, params in buckets.items() if params]
        if projected:
            groups += [{"name": "galore", **g} for g in galore_rank_groups(projected, self.galore, self.weight_decay)]
        return groups

    def build_optimizer(self, network: SamSegmenter) -> torch.optim.Optimizer:
        groups = self.optimizer_groups(network)
        if self.galore is not None:
            return galore_adamw(groups, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)

    def build_scheduler(self, optimizer: torch.optim.Optimizer, max_iterations: int) -> torch.optim.lr_scheduler.LambdaLR:
        return warmup_poly_scheduler(optimizer, max_iterations, self.warmup_iterations, self.poly_power)

    def build_loss(self, class_weights: torch.Tensor | None = None) -> nn.Module:
        """Loss on ``[B, N+1, H, W]`` logits and ``[B, 1, H, W]`` class-index labels.

        ``class_weights``: ``[N + 1]`` weights of the classes (background first) in both the
        cross-entropy and the Dice terms (``data.class_weights``); softmax losses only."""
        if class_weights is not None and self.loss != "dice_ce":
            raise ValueError(f"class_weights apply to the softmax loss (dice_ce); method {self.name!r} uses {self.loss!r}")
        if self.loss == "dice_bce":
            return DiceBceLoss()
        if self.loss == "dice_ce":
            return DiceCELoss(to_onehot_y=True, softmax=True, include_background=self.dice_background,
                              lambda_ce=self.ce_weight, lambda_dice=0.8, weight=class_weights)
        # Per-class queries: each foreground channel is its own sigmoid mask (background is 0).
        return DiceFocalLoss(to_onehot_y=True, sigmoid=True, include_background=False)


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES) or type(module).__name__ == "LayerNorm2d"


METHODS: dict[str, Method] = {
    "full": Method("full", trained_in_full=("backbone", "prompt")),
    "medsaga": Method("medsaga", galore=GaloreConfig(rank=32, update_proj_gap=200, scale=0.75, lr=8e-4),
                      dice_background=False),
    "samed": Method("samed", lora=ENCODER_QV_LORA, adapter_lr=2e-3),
    # S-SAM's code freezes the mask decoder (decoder_training 'none'; its 'full' option trains it):
    # behind a frozen decoder the class tokens had reached validation Dice 0.38 after 40 of 80
    # steps, so the few-shot default trains it (bundles/ssam/docs/README.md has both). The paper's
    # sigmoid focal + Dice loss (--method_def#loss dice_focal) learned more slowly than the
    # softmax read-out of the other methods: validation 0.60 against 0.73 after 70 steps.
    # The decoder's mask read-out starts at zero (readout="zero"), as the widened decoder's:
    # validation 0.86 after 40 steps against 0.46 from the pretrained read-out.
    "ssam": Method("ssam", prompt="class_tokens", svd=SvdConfig(), trained_in_full=("prompt", "backbone.mask_decoder"),
                   train_norms=True, train_position_embedding=True, lr=1e-3, adapter_lr=4e-3, head_lr=1e-2,
                   readout="zero"),
    # Cheap Lunch: LoRA r=4 on the encoder's q, v; the prompt encoder (6 K; LiteMedSAM learned
    # from boxes, its point embeddings are SAM's) and the mask decoder train in full. The paper
    # puts LoRA on the decoder's two-way transformer too (CHEAP_LUNCH_PAPER_*): on the MNI152 demo
    # (k = 5) that learned more slowly, test mean Dice 0.549 after 100 steps against 0.859 with
    # the whole decoder trained (bundles/cheap_lunch/docs/README.md). With LoRA alone behind a frozen mask head the
    # learn-something disk stayed at Dice 0.07 after 100 steps. Points come with a learned class
    # token per class (prompts.ClassPointPrompt), so that inference without clicks can find each
    # class first (inference/two_pass.py). The mask read-out starts at zero (readout="zero"):
    # after 100 steps test mean Dice 0.843 against 0.692 from the pretrained read-out.
    "cheap_lunch": Method("cheap_lunch", prompt="class_points", lora=ENCODER_QV_LORA,
                          trained_in_full=("backbone.prompt_encoder", "backbone.mask_decoder"), lr=1e-3,
                          adapter_lr=2e-3, head_lr=5e-3, ce_weight=1.0, readout="zero"),
    # MCP-MedSAM: full fine-tuning of LiteMedSAM and its prompt modules (box, class, modality and
    # content prompts: prompts/mcp.py) with AdamW at the paper's 2e-4 and weight decay 1e-3,
    # Dice + BCE per class. The paper's IoU-regression term is left out: SamSegmenter returns
    # class logits only, not the decoder's IoU predictions.
    "mcp_medsam": Method("mcp_medsam", prompt="mcp", trained_in_full=("backbone", "prompt"), lr=2e-4,
                         weight_decay=1e-3, loss="dice_bce"),
}


def get_method(name: str | Method, **overrides: Any) -> Method:
    """The registered method ``name`` with ``overrides`` (see :meth:`Method.with_overrides`)."""
    if isinstance(name, Method):
        return name.with_overrides(**overrides)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name].with_overrides(**overrides)


def build_network(method: str | Method, backbone: str = "lite_medsam", num_classes: int = 1,
                  checkpoint: str | None = "pretrained", image_size: int | None = None,
                  weights: str | None = None, class_names: Sequence[str] | None = None,
                  class_embeddings: str | None = None, decompose: bool = True,
                  prompt_options: dict | None = None) -> SamSegmenter:
    """The method's network: the backbone with its prompt kind and adapters, what it trains marked.

    Args:
        weights: a plain ``model.pt`` (as the bundles export) loaded before the adapters are
            injected, to fine-tune a previously trained model.
        class_names, class_embeddings: starting class tokens (class-token methods only).
        decompose: S-SAM computes each weight's SVD when injected; False leaves the factors
            empty, to be filled by ``load_state_dict`` (or to count parameters quickly).
        prompt_options: keyword arguments of the method's prompt kind (mcp_medsam: ``modalities``,
            ``modality_prompt``, ``content_prompt``, ``default_modality``).
    """
    spec = get_method(method)
    sam = build_backbone(backbone, image_size=image_size, checkpoint=checkpoint)
    prompt = spec.build_prompt(num_classes, sam.prompt_encoder.embed_dim, class_names, class_embeddings, prompt_options)
    network = SamSegmenter(sam, num_classes=num_classes, prompt=prompt)
    if spec.readout == "zero":
        reset_mask_readout(sam.mask_decoder)
    if weights:
        load_state_dict_strict(network, read_state_dict(weights), weights,
                               f"{spec.name} network ({backbone}, {num_classes} classes)")
    spec.inject_adapters(network, decompose=decompose)
    spec.mark_trainable(network)
    return network


def build_optimizer(method: str | Method, network: SamSegmenter) -> torch.optim.Optimizer:
    """The method's optimiser over exactly the parameters its network trains."""
    return get_method(method).build_optimizer(network)


def build_scheduler(method: str | Method, optimizer: torch.optim.Optimizer, max_iterations: int):
    """The method's warmup + poly schedule, stepped once per iteration."""
    return get_method(method).build_scheduler(optimizer, max_iterations)


def build_loss(method: str | Method, class_weights: torch.Tensor | None = None) -> nn.Module:
    return get_method(method).build_loss(class_weights)
