"""Instance-level forward patches: change how one module runs without changing its class or
its state_dict keys (activation checkpointing, autograd-free frozen segments, bf16 autocast)."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn


class ForwardPatch:
    """A callable installed as ``module.forward`` on the instance (state_dict keys unchanged).

    It calls whatever ``forward`` the module had before (the class method, or an earlier
    instance patch of another kind). Installing a patch of the same kind again replaces the
    previous one; :meth:`remove` restores the previous ``forward``. Subclasses define ``__call__``.
    """

    def __init__(self, module: nn.Module) -> None:
        previous = module.__dict__.get("forward")
        if isinstance(previous, type(self)):
            previous = previous.previous
        self.module = module
        self.previous = previous

    def install(self) -> None:
        self.module.forward = self

    def original_forward(self) -> Callable[..., Any]:
        if self.previous is not None:
            return self.previous
        return type(self.module).forward.__get__(self.module)

    @classmethod
    def outermost_on(cls, module: nn.Module) -> ForwardPatch | None:
        """This kind of patch if it is ``module``'s outermost ``forward``, else None."""
        patch = module.__dict__.get("forward")
        return patch if isinstance(patch, cls) else None

    @classmethod
    def remove(cls, module: nn.Module) -> None:
        """Undo this kind of patch on ``module`` if it is the outermost one (no-op otherwise)."""
        patch = cls.outermost_on(module)
        if patch is not None:
            if patch.previous is None:
                del module.forward
            else:
                module.forward = patch.previous

    @classmethod
    def installed_on(cls, module: nn.Module) -> bool:
        return cls.outermost_on(module) is not None
