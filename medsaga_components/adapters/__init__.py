"""Adapters: ways to train SAM's encoder cheaply, each injectable and mergeable back.

* ``lora``: LoRA (SAMed: rank 4 on q and v of every encoder block; Cheap Lunch: also the
  mask decoder's attention). ``inject_lora`` / ``merge_lora``.
* ``svd``: S-SAM's per-singular-value scale and shift. ``inject_svd`` / ``merge_svd``.
* ``galore``: MedSAGa's GaLore parameter groups (galore-torch is imported only when an
  optimiser is built). ``build_galore_optimizer``.
* ``counting``: parameter counts.

After ``merge_*`` a network's state_dict has exactly the plain network's keys, which is
what ``models/model.pt`` ships.
"""

from .counting import count_parameters, parameter_breakdown
from .galore import GaloreConfig, build_galore_optimizer, galore_parameter_groups
from .lora import (
    LoraConfig,
    LoraLinear,
    LowRankUpdate,
    inject_lora,
    lora_parameters,
    mark_only_lora_trainable,
    merge_lora,
    qkv_part_rows,
)
from .svd import (
    SingularValueAdapter,
    SvdConfig,
    SvdConv2d,
    SvdLinear,
    inject_svd,
    mark_only_svd_trainable,
    merge_svd,
    svd_parameters,
)

__all__ = [
    "count_parameters", "parameter_breakdown", "GaloreConfig", "build_galore_optimizer", "galore_parameter_groups",
    "LoraConfig", "LoraLinear", "LowRankUpdate", "inject_lora", "lora_parameters", "mark_only_lora_trainable",
    "merge_lora", "qkv_part_rows",
    "SingularValueAdapter", "SvdConfig", "SvdConv2d", "SvdLinear", "inject_svd", "mark_only_svd_trainable",
    "merge_svd", "svd_parameters",
]
