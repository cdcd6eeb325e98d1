"""Train until validation stops improving: patience, a wall-clock cap, and a record of what was used.

A fixed number of steps is tuned to one task: 80 steps learn the demo's tissue classes, and
stop long before small structures are learned (their validation Dice was still climbing
steeply at 80 steps). The bundles therefore train up to a step cap (``epochs``) and stop
earlier once validation has not improved for ``patience`` validations, or once
``max_minutes`` have passed. The best model is kept by ``SaveBestPlainModel`` as before.

A run whose validation has never reached ``min_score`` has learned nothing yet and is not on
a plateau: on the small-structure demo task medsaga's validation Dice was 0.000 for its first
50 steps, and a patience of 4 validations stopped it there (test Dice 0.000).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from medsaga_components.io.atomic import write_json_atomic

logger = logging.getLogger(__name__)


class TrainUntilPlateau:
    """Stops the trainer when the evaluator's key metric has not improved by more than
    ``min_delta`` for ``patience`` validations in a row, or after ``max_minutes`` of training;
    when training ends, logs and writes ``summary_path`` (JSON: steps, epochs, seconds, why it
    stopped, best validation metric and its epoch).

    Under torchrun every process evaluates the same validation slices with the same weights,
    so they reach the same patience decision; the clock is read per process, so the time-cap
    decision is all-reduced (any process over the cap stops them all).

    Args:
        evaluator: the validation engine (its ``key_metric_name`` is the score, higher is better).
        patience: validations without improvement before stopping; None or 0 never stops early.
        min_delta: an improvement must exceed this to reset the patience count.
        min_score: no plateau stop while the best validation score is below this (a run that
            has learned nothing has not plateaued); the step and time caps still apply.
        max_minutes: wall-clock cap on training (checked at the end of each epoch); None for none.
        summary_path: where the JSON record goes; None to only log it.
    """

    def __init__(self, evaluator: Engine, patience: int | None = 4, min_delta: float = 0.002,
                 min_score: float = 0.05, max_minutes: float | None = None, summary_path: str | Path | None = None) -> None:
        patience = _number_or_none("patience", patience, int)
        max_minutes = _number_or_none("max_minutes", max_minutes, float)
        if patience is not None and patience < 0:
            raise ValueError(f"patience must be >= 0 (0 or null: never stop early), got {patience!r}")
        if max_minutes is not None and max_minutes <= 0:
            raise ValueError(f"max_minutes must be positive (or null: no time cap), got {max_minutes!r}")
        self.evaluator = evaluator
        self.patience = patience or 0
        self.min_delta = float(min_delta)
        self.min_score = float(min_score)
        self.max_seconds = None if max_minutes is None else 60.0 * max_minutes
        self.summary_path = None if summary_path is None else Path(summary_path)
        self.best = -float("inf")  # best score so far and its epoch (the model kept)
        self.best_epoch = 0
        self.reference = -float("inf")  # the last score that gained more than min_delta
        self.reference_epoch = 0
        self.bad_validations = 0
        self.stop_reason = "step cap (epochs)"
        self.started = time.monotonic()
        self.trainer: Engine | None = None

    def attach(self, trainer: Engine) -> None:
        self.trainer = trainer
        trainer.add_event_handler(Events.STARTED, self._start)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._check_time)
        trainer.add_event_handler(Events.COMPLETED, self._report)
        self.evaluator.add_event_handler(Events.COMPLETED, self._check_validation)

    def _start(self, trainer: Engine) -> None:
        self.started = time.monotonic()

    def _check_validation(self, evaluator: Engine) -> None:
        score = float(evaluator.state.metrics[evaluator.state.key_metric_name])
        epoch = self.trainer.state.epoch
        if score > self.best:  # the model SaveBestPlainModel keeps
            self.best, self.best_epoch = score, epoch
        if score > self.reference + self.min_delta:
            self.reference, self.reference_epoch, self.bad_validations = score, epoch, 0
            return
        self.bad_validations += 1
        if self.patience and self.bad_validations >= self.patience and self.best >= self.min_score:
            self.stop_reason = (f"validation plateau: no gain above {self.min_delta} in {self.patience} "
                                f"validations after epoch {self.reference_epoch}")
            self.trainer.terminate()

    def _check_time(self, trainer: Engine) -> None:
        if self.max_seconds is None or trainer.should_terminate:
            return
        over = torch.tensor(float(time.monotonic() - self.started >= self.max_seconds))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(over, op=torch.distributed.ReduceOp.MAX)
        if over.item():
            self.stop_reason = f"time cap: {self.max_seconds / 60:g} minutes"
            trainer.terminate()

    # Saved in the training checkpoints (training/setup.py): a resumed run keeps counting
    # validations without a gain from where the interrupted one stopped. The time cap counts
    # from each (re)start.
    def state_dict(self) -> dict[str, float | int]:
        return {"best": self.best, "best_epoch": self.best_epoch, "reference": self.reference,
                "reference_epoch": self.reference_epoch, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])
        self.reference, self.reference_epoch = float(state["reference"]), int(state["reference_epoch"])
        self.bad_validations = int(state["bad_validations"])

    def summary(self, trainer: Engine) -> dict:
        return {
            "steps": int(trainer.state.iteration),
            "epochs": int(trainer.state.epoch),
            "seconds": round(time.monotonic() - self.started, 1),
            "stopped_by": self.stop_reason,
            "best_validation": None if self.best == -float("inf") else round(self.best, 4),
            "best_epoch": self.best_epoch,
        }

    def _report(self, trainer: Engine) -> None:
        record = self.summary(trainer)
        logger.info("training used %d steps (%d epochs) in %.0f s; stopped by %s; best validation %s at epoch %d",
                    record["steps"], record["epochs"], record["seconds"], record["stopped_by"],
                    record["best_validation"], record["best_epoch"])
        if self.summary_path is not None and _is_first_process():
            write_json_atomic(self.summary_path, record)


def _number_or_none(key: str, value, kind: type):
    """``value`` as ``kind``; None for None or the strings "null"/"none" (what a command line
    such as ``--max_minutes null`` passes through)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "")):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number or null, got {value!r}") from None


def _is_first_process() -> bool:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0
