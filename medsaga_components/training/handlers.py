"""Ignite handler the training run attaches to validation: export of the best plain model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

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

    def __init__(self, network: nn.Module, path: str | Path, class_names: Sequence[str] | None = None) -> None:
        self.network = network
        self.path = Path(path)
        self.class_names = class_names

    def attach(self, evaluator: Engine) -> None:
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, evaluator: Engine) -> None:
        if evaluator.state.best_metric_epoch == evaluator.state.epoch:
            save_plain_model(self.network, self.path)
            if hasattr(getattr(self.network, "module", self.network), "prompt"):  # a SamSegmenter
                write_model_info(self.network, self.path, self.class_names)
            logger.info("saved %s (validation %s %.4f at epoch %d)", self.path, evaluator.state.key_metric_name
                        if hasattr(evaluator.state, "key_metric_name") else "key metric",
                        evaluator.state.best_metric, evaluator.state.epoch)


def handlers_for_this_process(handlers: list) -> list:
    """``handlers`` on the main process of a ``torchrun`` job (rank 0, or no job); on the other
    processes only those that steer training and must run in step everywhere: the learning-rate
    schedule, validation (its metric is reduced across processes) and stopping. Logging, the
    progress bar, saving the best model and the test evaluation run once, on rank 0."""
    import torch.distributed as dist
    from monai.handlers import LrScheduleHandler, ValidationHandler

    from medsaga_components.training.stopping import TrainUntilPlateau

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        return list(handlers)
    return [h for h in handlers if isinstance(h, (LrScheduleHandler, ValidationHandler, TrainUntilPlateau))]
