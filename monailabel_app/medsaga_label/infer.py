"""Infer tasks on MONAI Label's ``BasicInferTask`` (its ``BundleInferTask`` imports torchvision,
which the CPU build of torch here cannot load).

``BundleSegmentation`` runs the bundle's own inference path: ``preprocessing``, the network
of ``network_def`` with ``models/model.pt`` loaded by ``inference.model.load_plain_model`` (strict,
plain tensors), the ``inferer`` (``SquareSliceInferer``) and ``postprocessing`` without its
writer. ``PromptedBundleSegmentation`` replaces the inferer by :class:`PromptedSliceInferer`
for methods that take a user's points or boxes.

A new ``models/model.pt`` (after training) is loaded by the next request: networks are
cached per device with the file's modification time.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Dict, Sequence

import torch
from monai.transforms import SqueezeDimd, ToNumpyd
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.transform.writer import Writer

from medsaga_components.inference.prompted import PromptedSliceInferer, prompts_from_request

from .bundles import ServedBundle


class BundleSegmentation(BasicInferTask):
    """Automatic segmentation of a volume with a trained bundle (no prompts)."""

    def __init__(self, bundle: ServedBundle, description: str | None = None) -> None:
        self.bundle = bundle
        self._lock = threading.Lock()
        super().__init__(
            path=str(bundle.model_path),
            network=None,
            type=InferType.SEGMENTATION,
            labels=bundle.labels,
            # Volumes in, volumes out (the 2-D network runs slice by slice).
            dimension=3,
            description=description or f"{bundle.name}: automatic segmentation of a volume, slice by slice",
            input_key=bundle.input_key,
            output_label_key=bundle.output_key,
        )
        self._pre = bundle.preprocessing()
        self._post = bundle.postprocessing()
        self._inferer = bundle.inferer()
        self._model_path = bundle.model_path

    def is_valid(self) -> bool:
        # Listed before it has a model, so that the studio shows it and its trainer; infer
        # then answers with the error of _get_network.
        return True

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return self._pre

    def inferer(self, data=None):
        return self._inferer

    def post_transforms(self, data=None) -> Sequence[Callable]:
        # [N + 1, X, Y, Z] logits -> [X, Y, Z] uint8 label map with the image's affine
        # (MONAI Label's writer takes the affine from the input image).
        return [*self._post, SqueezeDimd(keys=self.output_label_key, dim=0),
                ToNumpyd(keys=self.output_label_key, dtype="uint8")]

    def writer(self, data: Dict[str, Any], extension=None, dtype=None):
        # MONAI Label's default writer takes the affine from the label array, which after
        # argmax carries none: write it with the input image's affine (and nibabel for NIfTI).
        data["labels"] = self.labels
        return Writer(label=self.output_label_key, json=self.output_json_key, ref_image=self.input_key,
                      nibabel=True)(data)

    def _get_network(self, device, data):
        path = self._model_path
        if not path.is_file():
            raise MONAILabelException(
                MONAILabelError.INFERENCE_ERROR,
                f"bundle '{self.bundle.name}' has no trained model yet ({path} not found): train it first "
                f"(save labels, then POST /train/{self.bundle.name}; or python -m monai.bundle run training "
                f"--config_file {self.bundle.root / 'configs' / 'train.json'})")
        from medsaga_components.inference.model import load_plain_model
        from medsaga_components.inference.openvino_encoder import use_openvino
        from medsaga_components.precision import use_bf16

        stamp = os.stat(path).st_mtime_ns
        with self._lock:  # concurrent requests build the network once
            cached = self._networks.get(device)
            if cached is None or cached[1] != stamp:
                network = load_plain_model(self.bundle.build_network(), path).to(torch.device(device)).eval()
                # as the bundle's own `run inference`
                network = use_openvino(use_bf16(network, self.bundle.bf16), self.bundle.openvino)
                self._networks[device] = (network, stamp)
            return self._networks[device][0]

    def run_inferer(self, data: Dict[str, Any], convert_to_batch=True, device="cuda"):
        network = self._get_network(device, data)
        inputs = data[self.input_key]
        inputs = (inputs if torch.is_tensor(inputs) else torch.from_numpy(inputs))[None].to(torch.device(device))
        with torch.no_grad():
            outputs = self.call_inferer(inputs, network, data)
        data[self.output_label_key] = outputs[0]
        return data

    def call_inferer(self, inputs: torch.Tensor, network: torch.nn.Module, data: Dict[str, Any]) -> torch.Tensor:
        return self._inferer(inputs, network)


class PromptedBundleSegmentation(BundleSegmentation):
    """Segmentation from the points or boxes a user draws (methods whose prompt kind takes them).

    Request parameters (voxel indices of the image array):
    points: one key per label name, ``{"grey matter": [[i, j, k], ...]}`` (each click
    segments its slice); boxes: ``{"boxes": {"grey matter": [[i0, j0, k0, i1, j1, k1], ...]}}``,
    one box per structure, propagated through the volume from each box's middle slice and
    never outside the box; or a label file sent with the request, whose labelled slices are
    completed to the volume and kept as drawn (the bundle's inferer with the request,
    ``inference.volume``).
    """

    def __init__(self, bundle: ServedBundle) -> None:
        if bundle.prompt_input is None:
            raise ValueError(f"bundle {bundle.name}: its method's prompt kind {bundle.prompt_kind!r} takes no "
                             "user prompts")
        kind = "clicks (points)" if bundle.prompt_input == "points" else "boxes"
        super().__init__(bundle, f"{bundle.name}: segmentation from the {kind} a user draws")
        self.type = InferType.DEEPGROW if bundle.prompt_input == "points" else InferType.SEGMENTATION
        self._prompted = PromptedSliceInferer(bundle.image_size, bundle.axis, bundle.prompt_input, len(bundle.labels))

    def call_inferer(self, inputs, network, data):
        try:
            if self.bundle.prompt_input == "boxes":  # a label sent with the request: its labelled slices
                request = {"label": data["label"]} if data.get("label") else {"boxes": data.get("boxes") or {}}
                return self._inferer(inputs, network, prompts=request)
            prompts = prompts_from_request(data, self.bundle.labels, self.bundle.prompt_input)
            return self._prompted(inputs, network, prompts)
        except ValueError as exc:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"{self.bundle.name}: {exc}") from exc
