"""Adapters: trainable additions to frozen pretrained layers, each injectable and mergeable back.

* ``base``: the contract all adapters share (``AdapterLayer``, ``replace_layers``,
  ``merge_adapters``, ``adapter_parameters``, ``mark_trainable``).
* ``lora``: LoRA (SAMed: rank 4 on q and v of every encoder block; Cheap Lunch: also the
  mask decoder's attention). ``inject_lora``.
* ``svd``: S-SAM's per-singular-value scale and shift. ``inject_svd``.
* ``counting``: parameter counts.

After ``merge_adapters`` a network's state_dict has exactly the plain network's keys, which is
what ``models/model.pt`` ships. GaLore changes no layer: it is an optimiser
(``medsaga_components.optimizers``).
"""

from .base import AdapterLayer, adapter_parameters, mark_only_adapters_trainable, mark_trainable, merge_adapters
from .counting import count_parameters, parameter_breakdown
from .lora import LoraConfig, LoraLinear, LowRankUpdate, inject_lora, qkv_part_rows
from .svd import SingularValueAdapter, SvdConfig, SvdConv2d, SvdLinear, inject_svd

__all__ = [
    "AdapterLayer", "adapter_parameters", "mark_only_adapters_trainable", "mark_trainable", "merge_adapters",
    "count_parameters", "parameter_breakdown", "LoraConfig", "LoraLinear", "LowRankUpdate", "inject_lora",
    "qkv_part_rows", "SingularValueAdapter", "SvdConfig", "SvdConv2d", "SvdLinear", "inject_svd",
]
