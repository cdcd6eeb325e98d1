"""Optional parts of a training run, switched by top-level bundle keys: checkpoints and resume,
TensorBoard.

A run stopped at any moment (Ctrl-C, a scheduler's SIGKILL) and restarted with ``--resume True``
continues from its last checkpoint as if it had never stopped: besides the network, optimiser,
schedule and trainer state, each checkpoint holds the evaluator's best validation metric (so the
first validation after a restart cannot replace a better ``models/model.pt`` with a worse one),
the random number generators' states (the same batches and augmentations follow) and the
few-shot slices trained on (a restart that selected other slices is refused). A handler attached
to the trainer that has ``state_dict()`` and ``load_state_dict()`` (an early-stopping counter, say)
is saved too, as the entry ``handler:<its class name>``.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import TensorBoardStatsHandler, ValidationHandler, from_engine
from torch import nn

from medsaga_components.io.checkpoints import CheckpointError, load_checkpoint, load_state_dict_strict
from medsaga_components.config_values import as_bool

logger = logging.getLogger(__name__)

# Kept: the last two epochs' checkpoints. ignite deletes the oldest before writing the newest, so
# with one kept, a kill between the two steps would leave nothing to resume from.
CHECKPOINTS_KEPT = 2
# Entries a checkpoint written before they existed lacks; resuming from it still works.
OPTIONAL_ENTRIES = ("validation", "random_state", "fewshot")
HANDLER_ENTRY = "handler:"


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest ``*.pt`` written by the CheckpointSaver in ``checkpoint_dir``, if any."""
    files = sorted(Path(checkpoint_dir).glob("*.pt"), key=lambda p: p.stat().st_mtime_ns)
    return files[-1] if files else None


class BestValidationMetric:
    """The evaluator's best key metric and its epoch, as a checkpoint entry."""

    def __init__(self, evaluator: Engine) -> None:
        self.evaluator = evaluator

    def state_dict(self) -> dict[str, float | int]:
        return {"best_metric": float(self.evaluator.state.best_metric),
                "best_metric_epoch": int(self.evaluator.state.best_metric_epoch)}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])


def _numpy_state(generator: np.random.RandomState | None = None) -> dict[str, Any]:
    """A numpy generator's state as plain tensors and numbers (``weights_only`` loads those)."""
    name, keys, position, has_gauss, cached = (generator.get_state() if generator is not None
                                               else np.random.get_state())
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_tuple(state: dict[str, Any]) -> tuple:
    return (state["name"], state["keys"].numpy().astype(np.uint32), state["position"], state["has_gauss"],
            state["cached_gaussian"])


def _randomizables(data: Any) -> Iterator[Any]:
    """The random transforms (MONAI ``Randomizable``, each with its own generator ``R``) that the
    datasets behind ``data`` (a DataLoader, a ConcatDataset, a SliceDataset) apply, each once."""
    seen: set[int] = set()
    pending = [getattr(data, "dataset", data)]
    while pending:
        item = pending.pop(0)
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(getattr(item, "R", None), np.random.RandomState):
            yield item
        pending.extend(getattr(item, "datasets", []) or [])  # ConcatDataset
        pending.append(getattr(item, "transform", None))  # a dataset's transform
        pending.extend(getattr(item, "transforms", []) or [])  # Compose


class RandomStates:
    """Every random generator a training step draws from (torch, CUDA, numpy, Python, the data
    augmentation's own generators), as a checkpoint entry: a resumed run draws what the
    uninterrupted run would have drawn."""

    def __init__(self, data: Any = None) -> None:
        self.transforms = list(_randomizables(data)) if data is not None else []

    def state_dict(self) -> dict[str, Any]:
        python = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state(),
            "python": [python[0], list(python[1]), python[2]],
            "transforms": [_numpy_state(t.R) for t in self.transforms],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        np.random.set_state(_numpy_tuple(state["numpy"]))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if len(state["transforms"]) != len(self.transforms):
            raise CheckpointError(f"the checkpoint holds {len(state['transforms'])} random transforms' states, "
                                  f"this run has {len(self.transforms)}: the augmentation settings changed")
        for transform, saved in zip(self.transforms, state["transforms"]):
            transform.R.set_state(_numpy_tuple(saved))


def _fewshot_dataset(data: Any) -> Any:
    """The few-shot ``SliceDataset`` behind a training DataLoader, if there is one."""
    dataset = getattr(data, "dataset", data)
    for candidate in [dataset, *(getattr(dataset, "datasets", []) or [])]:
        if hasattr(candidate, "slices") and hasattr(candidate, "dataset"):
            return candidate
    return None


class FewShotSlices:
    """The few-shot slices a run trains on, as a checkpoint entry; loading refuses other slices."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def state_dict(self) -> dict[str, Any]:
        return {"dataset_json": str(self.dataset.dataset.path),
                "slices": [[r.volume, r.label or "", int(r.axis), int(r.slice_index)] for r in self.dataset.slices]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        now = self.state_dict()
        if now != state:
            raise CheckpointError(
                f"resume: the checkpoint was trained on {len(state['slices'])} few-shot slices of "
                f"{state['dataset_json']}, this run selected {len(now['slices'])} of {now['dataset_json']} "
                f"(first differing: {_first_difference(state['slices'], now['slices'])}); resume with the "
                "dataset and few-shot settings (shots, seed, strategy, spacing, axis) of the interrupted run, "
                "or start a new run without --resume"
            )


def _first_difference(saved: list, now: list) -> str:
    for a, b in zip(saved, now):
        if a != b:
            return f"checkpoint {a} vs this run {b}"
    return "one list is longer"


def _attached_handlers(trainer: Engine) -> Iterator[Any]:
    """The objects attached to ``trainer`` as event handlers (each once, in attachment order)."""
    seen: set[int] = set()
    for handlers in trainer._event_handlers.values():
        for handler, _, _ in handlers:
            parent = getattr(handler, "_parent", None)  # ignite wraps filtered handlers (every=N)
            handler = parent() if parent is not None else handler
            handler = getattr(handler, "__self__", handler)  # a bound method: its object
            if id(handler) not in seen:
                seen.add(id(handler))
                yield handler


def find_validator(trainer: Engine) -> Engine | None:
    """The evaluator a ``ValidationHandler`` attached to ``trainer`` runs, if any."""
    for handler in _attached_handlers(trainer):
        if isinstance(handler, ValidationHandler) and handler.validator is not None:
            return handler.validator
    return None


def stateful_handlers(trainer: Engine) -> dict[str, Any]:
    """Handlers attached to ``trainer`` that carry state across epochs (``state_dict`` and
    ``load_state_dict``), by checkpoint entry name."""
    return {f"{HANDLER_ENTRY}{type(h).__name__}": h for h in _attached_handlers(trainer)
            if not isinstance(h, Engine) and callable(getattr(h, "state_dict", None))
            and callable(getattr(h, "load_state_dict", None))}


class ResumeFromCheckpoint:
    """Load a checkpoint (already read and checked) into the run when the trainer starts.

    Done at ``Events.STARTED``, as MONAI's CheckpointLoader does, because ignite resets the
    trainer's state when ``run()`` begins; the run's own ``max_epochs`` is kept, so a resumed run
    may also be extended.
    """

    def __init__(self, checkpoint: dict[str, Any], objects: dict[str, Any], path: Path) -> None:
        self.checkpoint = checkpoint
        self.objects = objects
        self.path = path

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.STARTED, self)

    def __call__(self, trainer: Engine) -> None:
        max_epochs = trainer.state.max_epochs
        for key, obj in self.objects.items():
            if key not in self.checkpoint:  # an optional entry (checked before) that an older checkpoint lacks
                logger.warning("%s has no %r entry: that state starts afresh", self.path, key)
                continue
            if isinstance(obj, nn.Module):
                load_state_dict_strict(obj, self.checkpoint[key], self.path, "network")
            else:
                obj.load_state_dict(self.checkpoint[key])
        if max_epochs is not None and trainer.state.epoch > max_epochs:
            raise CheckpointError(f"{self.path} ends at epoch {trainer.state.epoch}, after this run's last epoch "
                                  f"{max_epochs}; pass --epochs larger than {trainer.state.epoch} to train further")
        trainer.state.max_epochs = max_epochs
        self.checkpoint = {}  # free the tensors
        logger.info("resuming from %s at epoch %d (iteration %d)", self.path, trainer.state.epoch,
                    trainer.state.iteration)


def checkpoint_entries(trainer: Engine, network: nn.Module, optimizer, lr_scheduler,
                       validator: Engine | None = None) -> dict[str, Any]:
    """Everything a checkpoint holds, by entry name."""
    entries: dict[str, Any] = {"network": network, "optimizer": optimizer, "lr_scheduler": lr_scheduler,
                               "trainer": trainer}
    validator = validator if validator is not None else find_validator(trainer)
    if validator is not None:
        entries["validation"] = BestValidationMetric(validator)
    data = getattr(trainer, "data_loader", None)
    entries["random_state"] = RandomStates(data)
    fewshot = _fewshot_dataset(data)
    if fewshot is not None:
        entries["fewshot"] = FewShotSlices(fewshot)
    entries.update(stateful_handlers(trainer))
    return entries


def prepare_training(trainer: Engine, network: nn.Module, optimizer, lr_scheduler, checkpoint_dir: str | Path,
                     resume: bool = False, tensorboard: bool = False, output_dir: str | Path = "eval",
                     validator: Engine | None = None) -> None:
    """Attach checkpointing and what the switches ask for, before ``trainer.run()``.

    Every epoch the entries of ``checkpoint_entries`` are saved to ``checkpoint_dir`` (the last
    ``CHECKPOINTS_KEPT``, plus ``final.pt`` at the end). Done here rather than in the config's
    handler list because the saver must hold the trainer that holds the handlers.

    Args:
        resume: continue from the newest checkpoint in ``checkpoint_dir``. The file is read (safely)
            and checked now, before anything trains: an unsafe or unreadable file, another
            architecture or other few-shot slices stop the run here.
        tensorboard: log the training loss for TensorBoard into ``output_dir/tensorboard``.
        validator: the evaluator whose best metric is kept; by default the one the trainer's
            ``ValidationHandler`` runs.
    """
    resume, tensorboard = as_bool(resume, "resume"), as_bool(tensorboard, "tensorboard")
    entries = checkpoint_entries(trainer, network, optimizer, lr_scheduler, validator)
    if resume:
        path = latest_checkpoint(checkpoint_dir)
        if path is None:
            raise FileNotFoundError(f"resume=True but no checkpoint in {checkpoint_dir}")
        # GaLore's projector objects are in the optimizer state; let weights_only loading accept them.
        from medsaga_components.optimizers.galore import allow_galore_state_in_checkpoints

        allow_galore_state_in_checkpoints()
        checkpoint = load_checkpoint(path, "training checkpoint")
        if not isinstance(checkpoint, dict):
            raise CheckpointError(f"training checkpoint {path} holds a {type(checkpoint).__name__}, expected the "
                                  f"entries {sorted(entries)}")
        missing = [k for k in entries if k not in checkpoint and k not in OPTIONAL_ENTRIES
                   and not k.startswith(HANDLER_ENTRY)]
        if missing:
            raise CheckpointError(f"training checkpoint {path} lacks {missing}; expected the entries "
                                  f"{sorted(entries)} that prepare_training saves")
        if "fewshot" in entries and "fewshot" in checkpoint:
            entries["fewshot"].load_state_dict(checkpoint["fewshot"])  # refused now, not at the first batch
        load_state_dict_strict(network, checkpoint["network"], path, "network")
        ResumeFromCheckpoint(checkpoint, entries, path).attach(trainer)
    if tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError as exc:
            raise ImportError("tensorboard=True needs the tensorboard package: pip install 'medsaga[tracking]'") from exc
        TensorBoardStatsHandler(log_dir=str(Path(output_dir) / "tensorboard"), tag_name="train_loss",
                                output_transform=from_engine(["loss"], first=True)).attach(trainer)
    attach_checkpoint_saver(trainer, entries, checkpoint_dir)


def attach_checkpoint_saver(trainer: Engine, entries: dict[str, Any], checkpoint_dir: str | Path) -> None:
    """Save ``entries`` after every epoch (``checkpoint_epoch=<N>.pt``, the last ``CHECKPOINTS_KEPT``
    kept) and when training completes (``final.pt``).

    Each file is written to a temporary name and renamed (ignite's atomic ``DiskSaver``; MONAI's
    CheckpointSaver writes in place), so a run killed while saving leaves its previous checkpoint
    intact, never a truncated newest one for ``--resume`` to choke on. A run that fails with an
    exception saves nothing more: its state may be mid-epoch or broken, and a resume continues from
    the last completed epoch. Built on every rank; ignite writes on rank 0 only.
    """
    def saver() -> DiskSaver:
        return DiskSaver(str(checkpoint_dir), atomic=True, create_dir=True, require_empty=False)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, Checkpoint(
        entries, saver(), n_saved=CHECKPOINTS_KEPT, filename_pattern="checkpoint_epoch={global_step}.{ext}",
        global_step_transform=lambda engine, _: engine.state.epoch))
    trainer.add_event_handler(Events.COMPLETED, Checkpoint(entries, saver(), n_saved=1, filename_pattern="final.{ext}"))
