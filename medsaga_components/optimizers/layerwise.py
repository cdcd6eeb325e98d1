"""Per-parameter optimiser steps inside backward: the full-size gradients of the whole
network never coexist (PyTorch's "optimizer step in backward" pattern).

The memory-efficient training mode (``training.memory``, switch ``layerwise_steps``) wraps the
method's optimiser in :class:`LayerwiseOptimizer`.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Mapping

import torch


class LayerwiseOptimizer(torch.optim.Optimizer):
    """An optimiser that steps each parameter inside backward, as soon as its gradient is done.

    Wraps the groups of an existing optimiser (``torch.optim.AdamW``, ``GaLoreAdamW``, any
    optimiser whose update of a parameter reads only that parameter's gradient and state).
    Every parameter gets its own optimiser of the same class with a single group holding
    that parameter and a copy of its group's settings (rank, projection gap, scale for GaLore
    rank groups), so the update is the grouped optimiser's update. (For MedSAGa that is
    GaLoreAdamW for every parameter, as in the grouped optimiser: galore-torch's plain group
    is its own AdamW, eps 1e-6 and weight decay after the update, not ``torch.optim.AdamW``.) A
    ``register_post_accumulate_grad_hook`` on each parameter runs that optimiser and sets
    ``p.grad = None``: at most one parameter's full-size gradient exists at a time.

    What MONAI's ``SupervisedTrainer`` sees:

    * ``param_groups``: the wrapped optimiser's groups. The per-parameter optimisers copy
      their group's settings (``lr`` first) right before each step, so ``LambdaLR`` and
      MONAI's ``LrScheduleHandler`` built on this object change the rate actually used.
    * ``zero_grad()`` and ``step()``: cheap no-ops for hooked parameters, whose gradients
      are already consumed. ``step()`` still steps any parameter that holds a gradient
      (one set by hand, or after :meth:`remove_hooks`).
    * ``state``/``state_dict()``/``load_state_dict()``: the per-parameter optimisers write
      into this object's ``state``, so the state dict has the wrapped optimiser's format
      (loadable into the grouped optimiser and back). GaLore projector objects need
      ``medsaga_components.optimizers.galore.allow_galore_state_in_checkpoints()`` for
      ``torch.load(weights_only=True)``.

    Not compatible with: gradient accumulation (every backward steps), gradient clipping by
    global norm (no moment holds all gradients), GradScaler (loss scaling / inf checks), and
    multi-process DDP (these hooks fire before DDP's gradient all-reduce).

    Args:
        param_groups: the wrapped optimiser's ``param_groups`` (each a dict with ``params``).
        optimizer_class: the class of the per-parameter optimisers.
        defaults: the wrapped optimiser's ``defaults``.
        constructor_kwargs: extra keyword arguments for ``optimizer_class``.
    """

    def __init__(self, param_groups: list[dict], optimizer_class: type[torch.optim.Optimizer],
                 defaults: Mapping[str, Any], constructor_kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__([dict(group) for group in param_groups], dict(defaults))
        self.optimizer_class = optimizer_class
        kwargs = _constructor_kwargs(optimizer_class, defaults, constructor_kwargs or {})
        self._per_parameter: dict[torch.Tensor, tuple[torch.optim.Optimizer, int]] = {}
        self._hooks = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # galore-torch's deprecation notice
            for index, group in enumerate(self.param_groups):
                for p in group["params"]:
                    single = optimizer_class([{**_settings(group), "params": [p]}], **kwargs)
                    single.state = self.state  # one state for all: state_dict() covers every parameter
                    self._per_parameter[p] = (single, index)
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._step_parameter))

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> LayerwiseOptimizer:
        """The layerwise version of a freshly built (not yet stepped) ``optimizer``."""
        if any(optimizer.state.values()):
            raise ValueError("wrap the optimiser before it has stepped (its state would be dropped)")
        return cls(optimizer.param_groups, type(optimizer), optimizer.defaults)

    def _step_parameter(self, p: torch.Tensor) -> None:
        single, index = self._per_parameter[p]
        single.param_groups[0].update(_settings(self.param_groups[index]))
        single.step()
        p.grad = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Step the parameters that still hold a gradient: none while the hooks are installed."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p in self._per_parameter:
            if p.grad is not None:
                self._step_parameter(p)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for single, _ in self._per_parameter.values():
            single.state = self.state  # the base class replaced ``self.state`` with a new dict

    def remove_hooks(self) -> None:
        """Stop stepping in backward; :meth:`step` then steps like an ordinary optimiser."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


def _settings(group: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def _constructor_kwargs(optimizer_class: type, defaults: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """The defaults the class's constructor accepts (e.g. AdamW's ``decoupled_weight_decay``
    is a default but not an argument), plus galore-torch's warning switch when it has one."""
    accepted = inspect.signature(optimizer_class.__init__).parameters
    kwargs = {k: v for k, v in defaults.items() if k in accepted}
    if "no_deprecation_warning" in accepted:
        kwargs["no_deprecation_warning"] = True
    return {**kwargs, **extra}
