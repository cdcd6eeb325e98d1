"""Ignite handlers the bundles attach: export of the best plain model, final test evaluation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from ignite.engine import Engine, Events
from torch import nn

from ..backbones.checkpoints import load_checkpoint, load_state_dict_strict
from ..config_values import as_bool
from ..data import SliceDataset
from ..evaluation import evaluate_slice_dataset
from .export import merge_adapters, save_plain_model
from .flips import with_test_time_flips
from .zoom_inference import with_zoom, zoom_setting

logger = logging.getLogger(__name__)


class SaveBestPlainModel:
    """After each validation that improves the key metric, write ``path`` as plain tensors
    (adapters merged), so that ``models/model.pt`` always loads into the plain network."""

    def __init__(self, network: nn.Module, path: str | Path) -> None:
        self.network = network
        self.path = Path(path)

    def attach(self, evaluator: Engine) -> None:
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, evaluator: Engine) -> None:
        if evaluator.state.best_metric_epoch == evaluator.state.epoch:
            save_plain_model(self.network, self.path)
            logger.info("saved %s (validation %s %.4f at epoch %d)", self.path, evaluator.state.key_metric_name
                        if hasattr(evaluator.state, "key_metric_name") else "key metric",
                        evaluator.state.best_metric, evaluator.state.epoch)


def best_plain_model(network: nn.Module, model_path: Path) -> nn.Module:
    """``network`` with adapters merged and the best model's plain weights loaded (strict, the
    file named on a mismatch); the final weights, with a warning, when none was saved."""
    plain = merge_adapters(network)
    if model_path.is_file():
        load_state_dict_strict(plain, load_checkpoint(model_path, "model weights"), model_path, "network")
    else:
        logger.warning("%s not found: evaluating the final weights", model_path)
    return plain


def has_test_slices(dataset: SliceDataset) -> bool:
    """False, with a log line, when there is nothing to test (a datalist given with its own
    validation volumes, ``train#dataset#data`` + ``validate#dataset#data``, declares no test)."""
    if len(dataset):
        return True
    logger.warning("no test slices (the dataset declares none): test evaluation skipped")
    return False


class EvaluateOnTestVolumes:
    """When training completes: load the best plain model and evaluate it on the held-out
    test volumes (Dice and HD95 per class and volume, NIfTI predictions, overlays, report).
    ``test_time_flips``, ``prompts``, ``zoom``: see ``evaluate_test_volumes``."""

    def __init__(self, network: nn.Module, model_path: str | Path, dataset: SliceDataset, output_dir: str | Path,
                 device: str | torch.device = "cpu", batch_size: int = 4, test_time_flips: bool = False,
                 prompts: Callable | None = None, zoom: float | str = 1.0) -> None:
        self.network = network
        self.model_path = Path(model_path)
        self.dataset = dataset
        self.output_dir = Path(output_dir)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.test_time_flips = test_time_flips
        self.prompts = prompts
        self.zoom = zoom

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> dict:
        network = best_plain_model(self.network, self.model_path).to(self.device)
        if not has_test_slices(self.dataset):
            return {}
        summary = evaluate_test_volumes(network, self.dataset, self.output_dir, self.device, self.batch_size,
                                        self.test_time_flips, self.prompts, self.zoom)
        logger.info("test mean Dice %.4f -> %s", summary["mean_dice"], self.output_dir)
        return summary


def evaluate_test_volumes(network: nn.Module, dataset: SliceDataset, output_dir: str | Path,
                          device: str | torch.device = "cpu", batch_size: int = 4,
                          test_time_flips: bool = False, prompts: Callable | None = None,
                          zoom: float | str = 1.0) -> dict:
    """Predict every slice with ``network`` in eval mode and evaluate per volume: its class
    logits [B, N + 1, S, S] are resized to each slice's grid, then argmax (the same
    ``square_logits_to_labels`` as ``run inference``).

    ``test_time_flips``: the logits averaged over the four in-plane flips (``FlipAveraged``).
    ``prompts``: for point/box methods, an ``engine.label_prompts.PromptsFromLabels`` whose
    ``prompts(labels)`` gives each slice's prompts from its ground truth (the stand-in for a
    user's clicks or boxes), or an object whose ``logits(network, images)`` finds them itself
    (``point_inference.AutomaticPoints``); flips do not mirror prompts, so they cannot be combined.
    ``zoom``: a number > 1 or ``"structures"`` reads each slice at a higher scale
    (``zoom_inference.with_zoom``), for networks trained on the same crops; prompt-free only.
    """
    device = torch.device(device)
    test_time_flips = as_bool(test_time_flips, "test_time_flips")
    zoom = zoom_setting(zoom)
    if prompts is not None:
        if zoom != 1:
            raise ValueError("zoom cannot be combined with prompts (their pixels would not match the windows)")
        if test_time_flips:
            raise ValueError("test_time_flips cannot be combined with prompts (FlipAveraged does not mirror them): "
                             "set test_time_flips false for a prompted bundle")

        @torch.no_grad()
        def predict_prompted(batch: dict) -> torch.Tensor:
            if hasattr(prompts, "logits"):  # prompts found without the ground truth (two passes)
                return prompts.logits(network.eval(), batch["image"].to(device)).float().cpu()
            given = {k: v.to(device) for k, v in prompts.prompts(batch["label"]).items()}
            return network.eval()(batch["image"].to(device), given).float().cpu()

        return evaluate_slice_dataset(dataset, predict_prompted, output_dir, batch_size=batch_size,
                                      predict_from_batch=True)
    # eval(): batch norms (TinyViT's conv stage) must use their running statistics, not the
    # test batch's, and must not update them.
    network = with_test_time_flips(with_zoom(network.eval(), zoom), test_time_flips)

    @torch.no_grad()
    def predict(images: torch.Tensor) -> torch.Tensor:
        return network(images.to(device)).float().cpu()  # [B, N + 1, S, S] logits

    return evaluate_slice_dataset(dataset, predict, output_dir, batch_size=batch_size)
