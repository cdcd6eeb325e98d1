"""A trained bundle as a standard MONAI bundle zip, the file ``python -m monai.bundle download``
fetches: ``<name>_v<version>.zip`` holding one folder ``<name>/`` with ``configs/``, ``docs/``,
``LICENSE``, ``large_files.yml`` and ``models/model.pt``.

``models/model.pt`` in the zip is always plain tensors with adapters merged: it loads with
``torch.load(weights_only=True)`` and ``load_state_dict(strict=True)`` into the network that
the packaged ``inference.json`` builds. A model file that still holds adapter weights (LoRA,
SVD) is merged here through the bundle's method; anything else that does not fit is refused.

    medsaga package --bundle bundles/medsaga --out dist/
    medsaga package --bundle bundles/medsaga --out dist/ --backbone vit_b --image_size 512

Extra ``--key value`` settings are top-level config keys the model was trained with
(``backbone``, ``image_size``, ``num_classes``...): they are written into the packaged
configs, so that the downloaded bundle runs without overrides.
"""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path
from typing import Any

import torch

from medsaga_components.inference.model import BOX_MODE_FRAGMENT, model_info_path, trained_with_boxes
from medsaga_components.io.atomic import atomic_path

REQUIRED_FILES = ("configs/metadata.json", "configs/inference.json", "LICENSE", "large_files.yml", "docs/README.md")
# What a standard bundle ships besides models/model.pt; data/, eval/, runs/ and training
# checkpoints stay out.
PACKAGED = ("configs", "docs", "LICENSE", "large_files.yml")


class PackagingError(RuntimeError):
    """The bundle cannot be packaged; the message says which file and why."""


def bundle_identity(bundle: str | Path) -> tuple[str, str]:
    """``(name, version)``: the ``bundle_name`` of ``configs/inference.json`` (the folder name
    if absent) and the ``version`` of ``configs/metadata.json``."""
    root = Path(bundle)
    meta = _read_json(root / "configs" / "metadata.json")
    if "version" not in meta:
        raise PackagingError(f"{root / 'configs' / 'metadata.json'}: no 'version' key")
    name = _read_json(root / "configs" / "inference.json").get("bundle_name", root.name)
    return str(name), str(meta["version"])


def package_bundle(bundle: str | Path, out: str | Path = "dist", model: str | Path | None = None,
                   **settings: Any) -> Path:
    """Write ``out/<name>_v<version>.zip`` from the bundle folder ``bundle``; returns its path.

    Args:
        bundle: the bundle folder (``bundles/medsaga``).
        out: folder for the zip (created if missing).
        model: the weights to ship; default ``bundle/models/model.pt``.
        settings: top-level config values the model was trained with, written into every
            packaged config that has the key (an unknown key is an error).
    """
    root = Path(bundle)
    if not (root / "configs").is_dir():
        raise PackagingError(f"{root} is not a bundle folder: it has no configs/ folder")
    missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
    if missing:
        raise PackagingError(f"{root} lacks {missing}: a standard bundle ships them")
    model_path = Path(model) if model else root / "models" / "model.pt"
    if not model_path.is_file():
        raise PackagingError(
            f"{root} has no trained model ({model_path} not found): train it first, e.g. "
            f"python -m monai.bundle run training --config_file {root / 'configs' / 'train.json'} "
            f"--bundle_root {root}")
    name, version = bundle_identity(root)
    configs = _packaged_configs(root, settings)
    configs["metadata.json"] = _with_trained_classes(configs["metadata.json"], model_path)
    if trained_with_boxes(model_path) and BOX_MODE_FRAGMENT in configs:
        # the zip's inference.json serves the box-mode model as it was trained (no fragment to add)
        configs["inference.json"].update(configs[BOX_MODE_FRAGMENT])
    weights = plain_weights(root, configs["inference.json"], model_path)

    target = Path(out) / f"{name}_v{version}.zip"
    with atomic_path(target) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for part in PACKAGED:
                source = root / part
                files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
                for path in files:
                    relative = path.relative_to(root).as_posix()
                    if relative.startswith("configs/") and path.name in configs:
                        archive.writestr(f"{name}/{relative}", json.dumps(configs[path.name], indent=4) + "\n")
                    elif "__pycache__" not in path.parts:
                        archive.write(path, f"{name}/{relative}")
            with archive.open(f"{name}/models/model.pt", "w", force_zip64=True) as stream:
                torch.save(weights, stream)
            info = model_info_path(model_path)
            if info.is_file():  # what the weights were trained as: prompt kind, classes
                archive.write(info, f"{name}/models/model.json")
    return target


def plain_weights(root: Path, inference_config: dict, model_path: Path) -> dict[str, torch.Tensor]:
    """The state dict to ship: ``model_path``'s tensors, adapters merged, checked by a strict
    load into the network that ``inference_config``'s ``network_def`` builds."""
    from medsaga_components.io.checkpoints import CheckpointError, load_state_dict_strict, read_state_dict
    from medsaga_components.adapters.export import plain_state_dict

    try:
        state = read_state_dict(model_path)  # weights_only=True: plain tensors or an error
    except CheckpointError as exc:
        raise PackagingError(str(exc)) from exc
    plain = _build(inference_config, "network_def", root, model_path)
    hint = "(pass the settings it was trained with, e.g. --backbone, --image_size, --num_classes)"
    try:
        if set(state) - set(plain.state_dict()):
            # Keys the plain network lacks: adapter weights (lora_A, scale...) left in the file;
            # merge them through the bundle's method.
            adapted = _adapted_network(root, inference_config, plain)
            load_state_dict_strict(adapted, state, model_path, "adapted (not yet merged) network")
            state = plain_state_dict(adapted)
        load_state_dict_strict(plain, state, model_path, "plain inference network")
    except CheckpointError as exc:
        raise PackagingError(f"{exc} {hint}") from exc
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def package_command(bundle: str, out: str = "dist", model: str | None = None, **settings: Any) -> str:
    """``medsaga package``: write the bundle zip and print its path."""
    return str(package_bundle(bundle, out, model, **settings))


def _packaged_configs(root: Path, settings: dict[str, Any]) -> dict[str, dict]:
    """Every ``configs/*.json`` with ``settings`` applied to the top-level keys it has."""
    configs = {p.name: _read_json(p) for p in sorted((root / "configs").glob("*.json"))}
    unknown = sorted(k for k in settings if not any(k in c for c in configs.values()))
    if unknown:
        raise PackagingError(f"settings {unknown} are no top-level key of any config in {root / 'configs'}")
    for config in configs.values():
        config.update({k: v for k, v in settings.items() if k in config})
    return configs


def _build(config: dict, key: str, root: Path, model_path: Path) -> torch.nn.Module:
    from monai.bundle import ConfigParser

    parser = ConfigParser(copy.deepcopy(config))  # the parser edits the dict it is given
    parser.read_meta(str(root / "configs" / "metadata.json"))  # @_meta_, as monai.bundle run reads it
    parser["bundle_root"] = str(root)
    parser["model_path"] = str(model_path)  # its model.json names the classes
    return parser.get_parsed_content(key, instantiate=True)


def _with_trained_classes(metadata: dict, model_path: Path) -> dict:
    """``metadata`` whose first output's ``channel_def`` and ``num_channels`` name the classes the
    model was trained on (``models/model.json``), so that a downloaded bundle serves them."""
    from medsaga_components.inference.model import read_model_info

    names = read_model_info(model_path).get("class_names")
    if not names:
        return metadata
    output = next(iter(metadata["network_data_format"]["outputs"].values()))
    output["channel_def"] = {"0": "background", **{str(i): name for i, name in enumerate(names, start=1)}}
    output["num_channels"] = len(names) + 1
    return metadata


def _adapted_network(root: Path, inference_config: dict, plain: torch.nn.Module) -> torch.nn.Module:
    """The bundle's method network (adapters injected, not decomposed) for the inference
    settings, to read a model file saved before merging."""
    from .methods import build_network

    train_json = root / "configs" / "train.json"
    if not train_json.is_file():
        raise PackagingError(f"{train_json} not found: needed to merge the adapters of the model file")
    method = _read_json(train_json).get("method")
    if not method:
        raise PackagingError(f"{train_json}: no 'method' key, cannot merge the model file's adapters")
    return build_network(method, backbone=inference_config["backbone"], num_classes=plain.num_classes,
                         checkpoint=None, image_size=plain.image_size, decompose=False)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise PackagingError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PackagingError(f"{path} is not valid JSON: {exc}") from exc
