"""Volume inference with a 2-D SAM network, the way it was trained: slice by slice, each
slice fitted into the ``S x S`` square (longest side scaled, bottom/right zero-padded); with a
user's request for the volume (``--prompts``), by propagation from it (``inference.volume``)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type

from medsaga_components.config_values import as_bool
from medsaga_components.data.square_resize import fit_to_square, square_logits_to_slice
from medsaga_components.inference.flips import with_test_time_flips
from medsaga_components.inference.propagation import PROPAGATION_GUIDES
from medsaga_components.inference.zoom import with_zoom, zoom_setting


class SquareSliceInferer(Inferer):
    """``[B, C, X, Y, Z]`` volume -> ``[B, N + 1, X, Y, Z]`` logits, slicing along ``axis``.

    Slices go through the same functions as the test evaluation (``data.square_resize``):
    ``fit_to_square`` prepares them exactly as ``SliceDataset`` does for training, and
    ``square_logits_to_slice`` crops the network's logits and resizes them (bilinear) to the
    slice's own grid; the argmax comes after (the bundle's postprocessing).

    Args:
        image_size: S, the network's input side.
        axis: spatial axis to slice along (0, 1 or 2; 2 = axial for RAS volumes).
        batch_size: slices per network call.
        test_time_flips: average the logits over the four in-plane flips of each slice
            (``FlipAveraged``); four network calls per slice.
        zoom: > 1 reads each slice at that scale with a sliding window (``ZoomedSlidingWindow``),
            ``"structures"`` in two passes (``StructureCropTwoPass``); for networks trained
            with the same ``zoom``.
        labels: ``{class name: value}`` of the model (``inference.model.served_labels``), for
            requests that name classes.
        propagation_guide: what propagates a request through the volume, ``"self"`` (the
            network's own predictions) or ``"pretrained"`` (zero-shot LiteMedSAM guides, the
            network segments each slice; ``inference.volume.guide_network``).

    Called with ``prompts=`` (a request, ``inference.volume.parse_request``), a volume is segmented
    from it by propagation and the result comes back as one-hot class scores (the same argmax).
    """

    def __init__(self, image_size: int = 256, axis: int = 2, batch_size: int = 8,
                 test_time_flips: bool = False, zoom: float | str = 1.0,
                 labels: Mapping[str, int] | None = None, propagation_guide: str = "self") -> None:
        super().__init__()
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
        self.image_size = image_size
        self.axis = axis
        self.batch_size = batch_size
        self.test_time_flips = as_bool(test_time_flips, "test_time_flips")
        self.zoom = zoom_setting(zoom)  # an invalid zoom fails here, not at the first volume
        self.labels = dict(labels) if labels is not None else None
        if propagation_guide not in PROPAGATION_GUIDES:
            raise ValueError(f"propagation_guide is {propagation_guide!r}; expected one of {PROPAGATION_GUIDES}")
        self.propagation_guide = propagation_guide
        self._guide: tuple[int, torch.nn.Module | None] | None = None  # (id of the network it guides, guide)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any,
                 prompts: Mapping | None = None, **kwargs: Any) -> torch.Tensor:
        if inputs.ndim != 5:
            raise ValueError(f"expected a volume [B, C, X, Y, Z], got {tuple(inputs.shape)}")
        if prompts is not None:
            return self._from_request(inputs, network, prompts)
        dim = 2 + self.axis
        network = with_test_time_flips(with_zoom(network, self.zoom), self.test_time_flips)
        # Work on plain tensors; the volume's metadata (affine, file name) is put back at the end.
        volume = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        moved = volume.movedim(dim, 1)  # [B, D, C, H, W]
        b, depth, c, h, w = moved.shape
        slices = moved.reshape(b * depth, c, h, w)
        outputs = []
        for start in range(0, slices.shape[0], self.batch_size):
            squares, geometry = fit_to_square(slices[start:start + self.batch_size], self.image_size)
            outputs.append(square_logits_to_slice(network(squares, *args, **kwargs), geometry))
        logits = torch.cat(outputs).reshape(b, depth, -1, h, w).movedim(1, dim)  # [B, N+1, X, Y, Z]
        return convert_to_dst_type(logits, inputs)[0] if isinstance(inputs, MetaTensor) else logits

    def _from_request(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], request: Mapping) -> torch.Tensor:
        from medsaga_components.inference.volume import segment_volume_from_request

        if inputs.shape[0] != 1:
            raise ValueError(f"a request segments one volume at a time, got a batch of {inputs.shape[0]}")
        if self.labels is None:
            raise ValueError("SquareSliceInferer(labels=...) is needed to read a request's class names")
        volume = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        labels = segment_volume_from_request(network, volume[0], self.axis, request, self.labels,
                                             guide=self.guide_for(network))
        scores = torch.nn.functional.one_hot(torch.from_numpy(labels).long(), len(self.labels) + 1)
        scores = scores.movedim(-1, 0)[None].to(dtype=torch.float32, device=volume.device)  # [1, N + 1, X, Y, Z]
        return convert_to_dst_type(scores, inputs)[0] if isinstance(inputs, MetaTensor) else scores

    def guide_for(self, network: torch.nn.Module) -> torch.nn.Module | None:
        """The guide network, built once (it loads the pretrained weights) and again only for another network."""
        from medsaga_components.inference.volume import guide_network

        if self._guide is None or self._guide[0] != id(network):
            self._guide = (id(network), guide_network(self.propagation_guide, network))
        return self._guide[1]
