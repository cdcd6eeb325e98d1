"""The bundles an app serves: every folder of ``bundles/`` with ``configs/inference.json`` and
``configs/metadata.json``, read the way MONAI Label's own bundle tasks read them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

import torch

from medsaga_components.inference.model import BOX_MODE_FRAGMENT, served_labels, trained_with_boxes


class ServedBundle:
    """One bundle as the app serves it.

    Args:
        root: the bundle folder.
        overrides: top-level config keys applied to ``inference.json`` and ``train.json``
            (the settings the served model was trained with: ``backbone``, ``image_size``...).
    """

    def __init__(self, root: str | Path, overrides: Mapping[str, Any] | None = None) -> None:
        self.root = Path(root).resolve()
        self.name = self.root.name
        self.overrides = dict(overrides or {})
        self.metadata = _read_json(self.root / "configs" / "metadata.json")
        self.inference_config = _read_json(self.root / "configs" / "inference.json")
        self.box_mode = self._model_trained_with_boxes()
        if self.box_mode:
            self.inference_config.update(_read_json(self.root / "configs" / BOX_MODE_FRAGMENT))
        train_json = self.root / "configs" / "train.json"
        self.train_config = _read_json(train_json) if train_json.is_file() else None
        formats = self.metadata.get("network_data_format", {})
        try:
            self.input_key = next(iter(formats["inputs"]))
            self.output_key = next(iter(formats["outputs"]))
            output = formats["outputs"][self.output_key]
            output["channel_def"]  # required: the served labels fall back on it
            self.spatial_dims = len(output["spatial_shape"])
        except (KeyError, StopIteration) as exc:
            raise ValueError(f"{self.root / 'configs' / 'metadata.json'}: network_data_format needs inputs and "
                             f"outputs, the first output with channel_def and spatial_shape ({exc!r} missing)") from exc
        # MONAI Label's labels: {name: value} of the foreground classes the served model segments
        # (the names its training recorded, else channel_def).
        self.labels = served_labels(self._config_parser().get_parsed_content("model_path"), self.metadata)
        self._parser = None

    def _model_trained_with_boxes(self) -> bool:
        """Whether the bundle has the box-prompted mode and its ``models/model.pt`` was trained in
        it, as the training run recorded beside the weights (``models/model.json``)."""
        return (self.root / "configs" / BOX_MODE_FRAGMENT).is_file() and trained_with_boxes(
            self._config_parser().get_parsed_content("model_path"))

    @property
    def prompt_kind(self) -> str:
        """The method's prompt kind (``train.json``'s ``method``; ``"mcp"`` for a model trained
        in the box-prompted mode), else the inference network's ``prompt`` argument, else ``"none"``."""
        if self.box_mode:
            return "mcp"
        method = (self.train_config or {}).get("method")
        if isinstance(method, str) and not method.startswith(("$", "@")):
            from medsaga_components.methods import get_method

            return get_method(method).prompt
        return str(self.inference_config.get("network_def", {}).get("prompt", "none"))

    @property
    def prompt_input(self) -> str | None:
        """``"points"`` or ``"boxes"`` when the method takes a user's prompts, else None."""
        from medsaga_components.prompts import user_input_of

        return user_input_of(self.prompt_kind)

    @property
    def parser(self):
        """``inference.json`` with ``bundle_root`` and the overrides applied (parsed lazily)."""
        if self._parser is None:
            self._parser = self._config_parser()
        return self._parser

    def _config_parser(self):
        from monai.bundle import ConfigParser

        parser = ConfigParser(copy.deepcopy(self.inference_config))
        parser.read_meta(copy.deepcopy(self.metadata))
        parser["bundle_root"] = str(self.root)
        for key, value in self.overrides.items():
            parser[key] = value
        return parser

    @property
    def model_path(self) -> Path:
        return Path(self.parser.get_parsed_content("model_path"))

    @property
    def axis(self) -> int:
        return int(self.parser.get_parsed_content("axis"))

    @property
    def image_size(self) -> int:
        return int(self.parser.get_parsed_content("image_size"))

    @property
    def bf16(self) -> str | bool:
        """``inference.json``'s ``bf16`` (``"auto"``: bf16 autocast where the device runs it natively)."""
        return self.parser.get_parsed_content("bf16", default=False)

    @property
    def openvino(self) -> str | bool:
        """``inference.json``'s ``openvino`` (``"auto"``: the encoder run by OpenVINO where it is installed)."""
        return self.parser.get_parsed_content("openvino", default=False)

    def build_network(self) -> torch.nn.Module:
        """A new plain network from ``network_def`` (weights not loaded)."""
        return self.parser.get_parsed_content("network_def", instantiate=True, lazy=False)

    def preprocessing(self) -> list:
        """``preprocessing``'s transforms (load, channel first, intensity scaling)."""
        return list(self.parser.get_parsed_content("preprocessing").transforms)

    def inferer(self):
        return self.parser.get_parsed_content("inferer")

    def postprocessing(self) -> list:
        """``postprocessing``'s transforms without its writers: MONAI Label writes the result."""
        transforms = self.parser.get_parsed_content("postprocessing").transforms
        return [t for t in transforms if not type(t).__name__.startswith("Save")]


def discover_bundles(folder: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, ServedBundle]:
    """``{name: ServedBundle}`` for every ``folder/*/configs`` with inference.json and metadata.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"bundles folder {folder} not found (pass --conf bundles DIR)")
    found = {}
    for configs in sorted(folder.glob("*/configs")):
        if (configs / "inference.json").is_file() and (configs / "metadata.json").is_file():
            found[configs.parent.name] = ServedBundle(configs.parent, overrides)
    if not found:
        raise FileNotFoundError(f"no bundle in {folder}: expected */configs/inference.json and metadata.json")
    return found


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
