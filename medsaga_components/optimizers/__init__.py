"""Optimisers that make training cheaper without changing the network.

* ``galore``: MedSAGa's GaLoreAdamW, gradient low-rank projection of the encoder's weights
  (galore-torch is imported only when one is built).
* ``layerwise``: per-parameter steps inside backward, for the memory-efficient mode.
"""

from .galore import GaloreConfig, allow_galore_state_in_checkpoints, build_galore_optimizer, galore_adamw
from .layerwise import LayerwiseOptimizer

__all__ = ["GaloreConfig", "allow_galore_state_in_checkpoints", "build_galore_optimizer", "galore_adamw",
           "LayerwiseOptimizer"]
