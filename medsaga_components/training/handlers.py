"""Ignite handler the training run attaches to validation: export of the best plain model."""

from __future__ import annotations

import logging
from pathlib import Path

from ignite.engine import Engine, Events
from torch import nn

from medsaga_components.adapters.export import save_plain_model
from medsaga_components.inference.model import write_model_info

logger = logging.getLogger(__name__)


class SaveBestPlainModel:
    """After each validation that improves the key metric, write ``path`` as plain tensors
    (adapters merged), so that ``models/model.pt`` always loads into the plain network, and
    beside it ``model.json`` (``inference.model.write_model_info``: the prompt kind, classes
    and input side), from which MONAI Label learns how to serve it."""

    def __init__(self, network: nn.Module, path: str | Path) -> None:
        self.network = network
        self.path = Path(path)

    def attach(self, evaluator: Engine) -> None:
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, evaluator: Engine) -> None:
        if evaluator.state.best_metric_epoch == evaluator.state.epoch:
            save_plain_model(self.network, self.path)
            write_model_info(self.network, self.path)
            logger.info("saved %s (validation %s %.4f at epoch %d)", self.path, evaluator.state.key_metric_name
                        if hasattr(evaluator.state, "key_metric_name") else "key metric",
                        evaluator.state.best_metric, evaluator.state.epoch)
