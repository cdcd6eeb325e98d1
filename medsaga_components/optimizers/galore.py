"""GaLoreAdamW for MedSAGa: gradient low-rank projection of SAM's image encoder weights.

GaLore is an optimiser, not an adapter: the weights keep their shape and train in full, but
the Adam moments of the encoder's attention and MLP weights live in a rank-r subspace of
their gradients, refreshed every ``update_proj_gap`` steps. Every other trainable parameter
is stepped by plain AdamW in GaLoreAdamW's other groups. The public MedSAGa code built rank
groups but never passed them to ``GaLoreAdamW``, so it ran as plain AdamW; here the groups
are what the optimiser receives, and ``tests/test_optimizers_galore.py`` checks that the
optimiser state really has rank r.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_TARGETS = ("qkv", "proj", "lin1", "lin2", "fc1", "fc2")


@dataclass(frozen=True)
class GaloreConfig:
    """GaLore settings for the encoder's projected weights.

    Args:
        rank: r, the rank of the gradient subspace (capped at min(m, n) - 1 per weight).
        update_proj_gap: steps between recomputing each projection (an SVD of the gradient).
        scale: factor on the projected-back update (GaLore's alpha).
        proj_type: galore-torch's projection type (``"std"`` projects the smaller side).
        target_modules: names of the ``nn.Linear`` modules whose weights are projected.
        lr: learning rate of the rank groups (None: the optimiser's). Adam normalises the
            projected r x n gradient entry by entry; projected back onto an orthonormal basis of
            the weight's smaller side s, that update has an RMS of about sqrt(r / s) per entry,
            so a rank group moves each weight by about ``lr * scale * sqrt(r / s)``, where AdamW
            moves it by ``lr``. The medsaga method's lr 8e-4 with scale 0.75 gives 3.0, 2.7 and
            1.9 x 1e-4 for TinyViT's 128-, 160- and 320-wide stages at r = 32, the size of
            full fine-tuning's AdamW steps at 2e-4 (scale 0.25 gave a third of that).
    """

    rank: int = 32
    update_proj_gap: int = 200
    scale: float = 0.75
    proj_type: str = "std"
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    lr: float | None = None


def galore_target_weights(encoder: nn.Module, config: GaloreConfig) -> dict[str, nn.Parameter]:
    """The 2-D weights of the target linears under ``encoder``, by qualified name."""
    return {
        f"{name}.weight": module.weight
        for name, module in encoder.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in config.target_modules
    }


def galore_rank_groups(weights: list[nn.Parameter], config: GaloreConfig, weight_decay: float = 0.0) -> list[dict]:
    """GaLoreAdamW rank groups for 2-D ``weights``, one group per distinct rank.

    A weight whose smaller side is <= r gets rank min(m, n) - 1, so that no "projection" is as
    large as the weight itself.
    """
    by_rank: dict[int, list[nn.Parameter]] = {}
    for p in weights:
        if p.ndim != 2:
            raise ValueError(f"GaLore projects 2-D weights only, got a parameter of shape {tuple(p.shape)}")
        by_rank.setdefault(min(config.rank, min(p.shape) - 1), []).append(p)
    groups = []
    for rank, params in sorted(by_rank.items()):
        group = {"params": params, "rank": rank, "update_proj_gap": config.update_proj_gap,
                 "scale": config.scale, "proj_type": config.proj_type, "weight_decay": weight_decay}
        if config.lr is not None:
            group["lr"] = config.lr
        groups.append(group)
    return groups


def allow_galore_state_in_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` (MONAI's CheckpointLoader) read GaLore optimiser state.

    galore-torch keeps a ``GaLoreProjector`` object per projected weight in the state.
    """
    from galore_torch.galore_projector import GaLoreProjector

    torch.serialization.add_safe_globals([GaLoreProjector])


@functools.cache  # one class, imported lazily: galore-torch takes ~10 s to import
def _galore_adamw_class() -> type[torch.optim.Optimizer]:
    """``GaLoreAdamW`` that does not fix a projection from an all-zero gradient.

    galore-torch computes each weight's projection from the first gradient it sees and keeps
    it for ``update_proj_gap`` steps. An all-zero gradient (the first step of a SamSegmenter,
    whose class heads start at zero, sends none to the encoder) has no subspace: its SVD
    returns coordinate axes, and the encoder would then train only in its first r rows for
    the next ``update_proj_gap`` steps. Such a gradient is skipped until a real one arrives.
    """
    from galore_torch import GaLoreAdamW

    class ProjectingAdamW(GaLoreAdamW):
        @torch.no_grad()
        def step(self, closure=None):
            held = []
            for group in self.param_groups:
                if "rank" not in group:
                    continue
                for p in group["params"]:
                    if p.grad is not None and "projector" not in self.state[p] and not p.grad.any():
                        held.append((p, p.grad))
                        p.grad = None
            try:
                return super().step(closure)
            finally:
                for p, grad in held:
                    p.grad = grad

    ProjectingAdamW.__qualname__ = ProjectingAdamW.__name__ = "ProjectingAdamW"
    return ProjectingAdamW


def galore_adamw(param_groups: list[dict], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``GaLoreAdamW`` over ``param_groups`` (rank groups project; the others are plain AdamW groups).

    galore-torch is imported here only (about 10 s).
    """
    allow_galore_state_in_checkpoints()
    return _galore_adamw_class()(param_groups, lr=lr, weight_decay=weight_decay, no_deprecation_warning=True)


def build_galore_optimizer(model: nn.Module, config: GaloreConfig = GaloreConfig(), lr: float = 1e-4,
                           weight_decay: float = 0.0, encoder_name: str = "backbone.image_encoder") -> torch.optim.Optimizer:
    """``GaLoreAdamW`` over every trainable parameter of ``model``: the trainable target weights
    under ``encoder_name`` in rank groups, everything else trainable in one plain group.

    Which parameters train is the method's business (``methods.METHODS["medsaga"]`` freezes the
    rest of the encoder); this only groups them.
    """
    targets = [p for p in galore_target_weights(model.get_submodule(encoder_name), config).values() if p.requires_grad]
    if not targets:
        raise ValueError(f"no trainable {config.target_modules} linear layers under {encoder_name!r}")
    target_ids = {id(p) for p in targets}
    plain = [p for p in model.parameters() if p.requires_grad and id(p) not in target_ids]
    groups = [{"params": plain, "weight_decay": weight_decay}, *galore_rank_groups(targets, config, weight_decay)]
    return galore_adamw(groups, lr=lr, weight_decay=weight_decay)
