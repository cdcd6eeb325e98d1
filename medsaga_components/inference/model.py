"""The trained model a bundle serves: ``models/model.pt`` (plain tensors, adapters merged) loaded
into the bundle's network, strictly. The one loader that ``run inference``, the test evaluation,
MONAI Label and scripts use."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

from torch import nn

from medsaga_components.adapters.export import merged_copy
from medsaga_components.bundle_config import check_bundle_command_line
from medsaga_components.io.checkpoints import load_checkpoint, load_state_dict_strict

logger = logging.getLogger(__name__)

MISSING_MODEL_HINT = "run training first, or pass --model_path"


def load_plain_model(network: nn.Module, path: str | Path, missing_ok: bool = False) -> nn.Module:
    """A copy of ``network`` with its adapters merged and the plain weights of ``path`` loaded
    (strict: a mismatch names the file and the keys). ``missing_ok``: without the file, the
    copy keeps ``network``'s own weights, with a warning (the test evaluation after a run that
    never saved a best model)."""
    path = Path(path)
    plain = merged_copy(network)
    if path.is_file():
        load_state_dict_strict(plain, load_checkpoint(path, "model weights"), path, "network")
    elif missing_ok:
        logger.warning("%s not found: evaluating the final weights", path)
    else:
        raise FileNotFoundError(f"model weights not found: {path} ({MISSING_MODEL_HINT})")
    return plain


def check_model_file(path: str | Path, network: nn.Module | None = None) -> None:
    """Fail before inference starts when the trained weights are missing, unreadable or unsafe
    (read once here through ``load_checkpoint``, so the error names the file), when they do
    not fit ``network`` (another backbone, number of classes or prompt kind: the error names
    the file and the mismatch; the weights are then loaded into it), or when the command line
    has a misspelled key."""
    check_bundle_command_line()
    if not Path(path).is_file():
        raise FileNotFoundError(f"model weights not found: {path} ({MISSING_MODEL_HINT})")
    state = load_checkpoint(path, "model weights")
    if network is not None:
        load_state_dict_strict(network, state, path, "inference network_def (backbone, num_classes, prompt kind; "
                               "a model trained with configs/boxes.json needs configs/inference_boxes.json)")


def model_info_path(model_path: str | Path) -> Path:
    """``models/model.json`` beside ``models/model.pt``: what the weights were trained as."""
    return Path(model_path).with_suffix(".json")


def write_model_info(network: nn.Module, model_path: str | Path, class_names: Sequence[str] | None = None) -> Path:
    """Record beside the weights what serving them needs and the weights do not say plainly:
    the prompt kind (``PROMPT_KINDS`` name), the number of classes, the input side and, when
    given, the foreground class names (class values 1..N)."""
    from medsaga_components.io.atomic import write_json_atomic
    from medsaga_components.prompts import kind_name

    module = getattr(network, "module", network)
    info = {"prompt_kind": kind_name(module.prompt), "num_classes": int(module.num_classes),
            "image_size": int(module.image_size)}
    if class_names is not None:
        names = [str(n) for n in class_names]
        if len(names) != info["num_classes"]:
            raise ValueError(f"{len(names)} class names {names} for a network of {info['num_classes']} classes")
        info["class_names"] = names
    path = model_info_path(model_path)
    write_json_atomic(path, info)
    return path


def read_model_info(model_path: str | Path) -> dict:
    """``write_model_info``'s record, ``{}`` when there is none (a model saved by other means)."""
    path = model_info_path(model_path)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


# The configs that serve a model trained with configs/boxes.json, added on top of inference.json.
BOX_MODE_FRAGMENT = "inference_boxes.json"


def trained_with_boxes(model_path: str | Path) -> bool:
    """Whether ``model.json`` says the weights take boxes (box-mode training, ``configs/boxes.json``):
    they are then served through ``inference.json`` + ``BOX_MODE_FRAGMENT``."""
    from medsaga_components.prompts import user_input_of

    kind = read_model_info(model_path).get("prompt_kind")
    return kind is not None and user_input_of(kind) == "boxes"


def served_labels(model_path: str | Path, metadata: Mapping | str | Path) -> dict[str, int]:
    """``{class name: value}`` of the foreground classes a served model segments: the names
    training recorded in ``model.json``, else ``channel_def`` of the bundle's metadata (the
    ``metadata.json`` dict, as a bundle config's ``@_meta_``, or its path)."""
    names = read_model_info(model_path).get("class_names")
    if names:
        return {str(name): value for value, name in enumerate(names, start=1)}
    where = metadata if not isinstance(metadata, Mapping) else "the bundle's metadata"
    try:
        meta = metadata if isinstance(metadata, Mapping) else json.loads(Path(metadata).read_text())
        outputs = meta["network_data_format"]["outputs"]
        channel_def = next(iter(outputs.values()))["channel_def"]
    except (OSError, KeyError, StopIteration, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: no network_data_format outputs channel_def names the classes, and "
                         f"{model_info_path(model_path)} records none ({exc!r})") from exc
    return {str(name): int(value) for value, name in channel_def.items() if int(value) > 0}
