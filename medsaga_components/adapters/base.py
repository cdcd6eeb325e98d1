"""The contract every adapter follows, written once (the pattern of HuggingFace peft).

An adapter is a layer that replaces a pretrained layer, keeps the pretrained weights frozen
and adds a few trainable parameters of its own:

* :class:`AdapterLayer`: the base class. A subclass declares its trainable parameters
  (``adapter_parameter_names``) and how to fold itself back into a plain layer (``merge``).
* :func:`replace_layers`: find the target layers under a root and replace each, in place.
* :func:`merge_adapters`: every adapter folded back, so the state_dict has exactly the keys
  of the never-adapted network (what ``models/model.pt`` ships).
* :func:`adapter_parameters` / :func:`mark_trainable`: which parameters train.

``lora.py`` and ``svd.py`` hold only their layers and their ``inject_*`` target rules.
"""

from __future__ import annotations

from typing import Callable, Iterable

from torch import nn


class AdapterLayer(nn.Module):
    """A frozen pretrained layer plus trainable adapter parameters.

    Subclasses set ``adapter_parameter_names`` (the last dotted component of their own
    trainable parameters, e.g. ``("A", "B")``) and implement :meth:`merge`.
    """

    adapter_parameter_names: tuple[str, ...] = ()

    def merge(self) -> nn.Module:
        """A plain layer computing what this layer computes (dropout aside)."""
        raise NotImplementedError


def set_submodule(root: nn.Module, dotted_name: str, new: nn.Module) -> None:
    """Put ``new`` at ``dotted_name`` under ``root`` (``""`` is not allowed: replace the parent's child)."""
    parent_name, _, child = dotted_name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def replace_layers(module: nn.Module, root: str | None, matches: Callable[[str, nn.Module], bool],
                   wrap: Callable[[str, nn.Module], nn.Module], what: str) -> list[str]:
    """Replace every layer under ``module.<root>`` for which ``matches(name, layer)`` holds by
    ``wrap(name, layer)``, in place.

    Args:
        root: dotted name of the submodule to search (``"image_encoder"``), or None/"" for all
            of ``module``. Names given to ``matches``/``wrap`` are relative to it.
        what: describes the targets in the error raised when nothing matches (a typo in a
            target list would otherwise silently train nothing).
    Returns:
        Dotted names, relative to ``module``, of the replaced layers.
    """
    search_root = module.get_submodule(root) if root else module
    targets = [(name, layer) for name, layer in search_root.named_modules()
               if name and not isinstance(layer, AdapterLayer) and matches(name, layer)]
    # Layers inside an adapter (its frozen base) are never targets a second time.
    inside = [name for name, layer in search_root.named_modules() if isinstance(layer, AdapterLayer)]
    targets = [(n, l) for n, l in targets if not any(n.startswith(a + ".") for a in inside)]
    if not targets:
        raise ValueError(f"no {what} under {root or 'the module'!r}")
    for name, layer in targets:
        set_submodule(search_root, name, wrap(name, layer))
    return [f"{root}.{name}" if root else name for name, _ in targets]


def merge_adapters(module: nn.Module) -> nn.Module:
    """Replace every :class:`AdapterLayer` in ``module`` by its merged plain layer, in place.

    Afterwards ``module.state_dict()`` has exactly the keys and shapes of the network that was
    never adapted, so strict loaders (MONAI Label, ``load_state_dict(strict=True)``) accept it.
    Returns ``module``, or the merged layer when ``module`` itself is an adapter.
    """
    if isinstance(module, AdapterLayer):
        return module.merge()
    for name, layer in [(n, m) for n, m in module.named_modules() if isinstance(m, AdapterLayer)]:
        set_submodule(module, name, layer.merge())
    return module


def adapter_parameters(module: nn.Module, kind: type[AdapterLayer] = AdapterLayer) -> dict[str, nn.Parameter]:
    """``{dotted name: parameter}`` of the trainable parameters of every adapter of ``kind``."""
    found = {}
    for layer_name, layer in module.named_modules():
        if isinstance(layer, kind):
            for name, param in layer.named_parameters():
                if name.rpartition(".")[2] in layer.adapter_parameter_names:
                    found[f"{layer_name}.{name}" if layer_name else name] = param
    return found


def mark_trainable(module: nn.Module, keep: Callable[[str, nn.Parameter], bool]) -> list[str]:
    """``requires_grad`` on exactly the parameters ``keep(name, parameter)`` selects, off on all others.

    Returns the sorted names of the trainable parameters.
    """
    trainable = []
    for name, param in module.named_parameters():
        param.requires_grad_(bool(keep(name, param)))
        if param.requires_grad:
            trainable.append(name)
    return sorted(trainable)


def mark_only_adapters_trainable(module: nn.Module, extra_trainable_prefixes: Iterable[str] = ()) -> list[str]:
    """Freeze every parameter except the adapters' and those under the given name prefixes
    (e.g. ``("backbone.mask_decoder",)``, trained in full). Returns the trainable names."""
    prefixes = tuple(p.rstrip(".") for p in extra_trainable_prefixes)
    adapters = set(adapter_parameters(module))
    return mark_trainable(module, lambda name, _: name in adapters or has_prefix(name, prefixes))


def has_prefix(name: str, prefixes: Iterable[str]) -> bool:
    """Whether dotted ``name`` is one of ``prefixes`` or lies under one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)
