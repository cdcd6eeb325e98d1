"""The image encoder run by OpenVINO on CPUs, for inference: the same network, about 3x faster.

The image encoder holds nearly all of a slice's FLOPs (``precision.py``). Measured here (2 cores,
the medsaga MNI152 model, 24 test slices, ``scripts/time_exported_model.py``;
docs/memory_and_speed.md): eager float32 1.07 s a slice, eager bf16 autocast 0.58 s, the encoder
compiled by OpenVINO in float32 0.32 s with the same label maps, in bf16 0.21 s. TorchScript
(0.82 / 0.48 s) and ONNX Runtime (0.50 s) gained less. So this patch swaps only the encoder's
forward, as the bf16 autocast does; the prompt encoder, the mask decoder and every consumer of
image embeddings (two-pass, propagation, MONAI Label) are unchanged.

The encoder is traced with its current weights and compiled at its first call, after a bundle's
``CheckpointLoader`` has filled it, and again whenever its weights change (each parameter's
in-place version counter is part of the fingerprint). A call in training mode or one that needs
gradients runs the forward it replaced, so training steps never see it. Precision follows the
bundle's ``bf16`` key: float32 unless the bf16 autocast was installed (``use_bf16``), which this
patch then sits on (its fallback) and which comes back when it is removed. OpenVINO's own default
on CPUs with bf16 is bf16, so float32 is asked for explicitly.

The conversion goes through OpenVINO's PyTorch front end, not ``openvino.convert_model``: that
tool reports usage to Intel's telemetry unless a consent file says otherwise, and a hospital
pipeline must not call out.

The bundle key ``openvino``: ``"auto"`` (the default of ``inference.json``) uses it where the
``openvino`` package is installed (``pip install "medsaga[openvino]"``) and the network is on the
CPU; ``true`` insists (an error names what is missing); ``false`` keeps PyTorch. ``train.json``
has it off: on for a training run's validations and test evaluation, it saved 30 s of a 5-minute
run and raised the peak RSS by 0.8 GB.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import warnings
from typing import Any

import torch
from torch import nn

from medsaga_components.config_values import as_bool
from medsaga_components.forward_patch import ForwardPatch
from medsaga_components.precision import AUTO, EncoderAutocast, image_encoder_of, is_auto, use_bf16, uses_bf16

logger = logging.getLogger(__name__)


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def _weights_fingerprint(module: nn.Module) -> tuple:
    # data_ptr: a tensor replaced; _version: a tensor changed in place (load_state_dict, optimiser steps)
    return tuple((t.data_ptr(), t._version) for t in (*module.parameters(), *module.buffers()))


class _ClassForward(nn.Module):
    """The encoder's own class forward, past any instance patch (this one, or the bf16 autocast
    below it: OpenVINO sets the precision)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return type(self.encoder).forward(self.encoder, images)


class OpenVinoEncoder(ForwardPatch):
    """The image encoder's forward, ``[B, 3, S, S] -> [B, E, S/p, S/p]`` float32, by an OpenVINO model
    compiled for the CPU from the encoder's current weights.

    Args:
        module: the image encoder (``backbone.image_encoder``).
        bf16: compile with bf16 inference precision (else float32).
        threads: OpenVINO's inference threads (None: ``torch.get_num_threads()`` at compile time).
    """

    def __init__(self, module: nn.Module, bf16: bool = False, threads: int | None = None) -> None:
        super().__init__(module)
        self.bf16 = bf16
        self.threads = threads
        self._compiled = None
        self._fingerprint: tuple | None = None
        self._lock = threading.Lock()  # MONAI Label answers requests on several threads
        self.compilations = 0

    def __getstate__(self) -> dict:
        # a copy (copy.deepcopy of the network, as training's model saving does) compiles afresh
        return {k: v for k, v in self.__dict__.items() if k not in ("_compiled", "_fingerprint", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _compiled=None, _fingerprint=None, _lock=threading.Lock())

    def _compile(self, images: torch.Tensor) -> None:
        import openvino as ov
        from openvino.frontend import FrontEndManager
        from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

        with torch.no_grad(), warnings.catch_warnings():
            # torch deprecates TorchScript in favour of torch.export; OpenVINO's front end still reads the trace
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(_ClassForward(self.module), images[:1].float().cpu(), check_trace=False)
        frontend = FrontEndManager().load_by_framework("pytorch")
        decoder = TorchScriptPythonDecoder(traced)  # held until converted: the front end keeps only a pointer
        model = frontend.convert(frontend.load(decoder))
        model.reshape({0: ov.PartialShape([-1, *images.shape[1:]])})  # any batch, this image size
        config = {"INFERENCE_PRECISION_HINT": "bf16" if self.bf16 else "f32", "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": self.threads or torch.get_num_threads()}
        self._compiled = ov.Core().compile_model(model, "CPU", config)
        self._fingerprint = _weights_fingerprint(self.module)
        self.compilations += 1
        logger.info("image encoder compiled by OpenVINO %s (%s, %d threads)", ov.__version__,
                    config["INFERENCE_PRECISION_HINT"], config["INFERENCE_NUM_THREADS"])

    def __call__(self, images: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (images.requires_grad or any(
            p.requires_grad for p in self.module.parameters()))
        # a training-mode forward (batch statistics) or one that needs gradients stays in PyTorch
        if self.module.training or needs_grad or args or kwargs or images.device.type != "cpu":
            if self.module.training:  # a training step will change the weights: free the compiled model now
                self._compiled = None
            return self.original_forward()(images, *args, **kwargs)
        with self._lock:
            if self._compiled is None or self._fingerprint != _weights_fingerprint(self.module):
                self._compile(images)
            out = self._compiled(images.detach().float().contiguous().numpy())[0]
            return torch.from_numpy(out.copy())  # the request reuses its output buffer


def resolve_openvino(setting: Any, device: torch.device | str) -> bool:
    """The bundle key ``openvino`` (``"auto"``/None, true/false or their strings) for ``device``."""
    on_cpu = torch.device(device).type == "cpu"
    if is_auto(setting):
        return on_cpu and openvino_available()
    if not as_bool(setting, "openvino (expected auto, true or false)"):
        return False
    if not on_cpu:
        raise ValueError(f"openvino is true but the network is on {device}; OpenVINO runs the encoder on the CPU "
                         f"only (set openvino to false or auto)")
    if not openvino_available():
        raise ValueError('openvino is true but the openvino package is not installed: pip install "medsaga[openvino]" '
                         "(or set openvino to false or auto)")
    return True


def use_openvino(network: nn.Module, setting: Any = AUTO, encoder_name: str = "backbone.image_encoder") -> nn.Module:
    """Run ``network``'s image encoder through OpenVINO for inference when ``setting`` resolves to on
    (see the module doc), in bf16 if ``use_bf16`` turned the autocast on, else float32; off leaves
    it to PyTorch. Returns ``network`` (in place), so a bundle config can write
    ``use_openvino(use_bf16(@network_def.to(@device), @bf16), @openvino)``."""
    encoder = image_encoder_of(network, encoder_name)
    OpenVinoEncoder.remove(encoder)
    if resolve_openvino(setting, next(network.parameters()).device):
        OpenVinoEncoder(encoder, bf16=EncoderAutocast.installed_on(encoder)).install()
    logger.info("image encoder runtime: %s (openvino=%s)", encoder_runtime(network, encoder_name), setting)
    return network


def _openvino_patch(network: nn.Module, encoder_name: str = "backbone.image_encoder") -> OpenVinoEncoder | None:
    return OpenVinoEncoder.outermost_on(image_encoder_of(network, encoder_name))


def uses_openvino(network: nn.Module, encoder_name: str = "backbone.image_encoder") -> bool:
    return _openvino_patch(network, encoder_name) is not None


def encoder_runtime(network: nn.Module, encoder_name: str = "backbone.image_encoder") -> str:
    """What runs ``network``'s image encoder, in words: PyTorch or OpenVINO, float32 or bf16."""
    if (patch := _openvino_patch(network, encoder_name)) is not None:
        return f"OpenVINO {'bf16' if patch.bf16 else 'float32'}"
    return f"PyTorch {'bf16 autocast' if uses_bf16(network, encoder_name) else 'float32'}"


def same_encoder_runtime(network: nn.Module, like: nn.Module) -> nn.Module:
    """Give ``network``'s image encoder the runtime and precision of ``like``'s (PyTorch or OpenVINO,
    float32 or bf16), e.g. a propagation guide built beside a served model. Returns ``network``."""
    if (patch := _openvino_patch(like)) is not None:
        OpenVinoEncoder(image_encoder_of(network), bf16=patch.bf16, threads=patch.threads).install()
        return network
    return use_bf16(network, uses_bf16(like))


__all__ = ["OpenVinoEncoder", "encoder_runtime", "openvino_available", "resolve_openvino", "same_encoder_runtime",
           "use_openvino", "uses_openvino"]
