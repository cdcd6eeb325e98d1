"""Optional parts of a training run, switched by top-level bundle keys."""

from __future__ import annotations

import logging
from pathlib import Path

from ignite.engine import Engine
from monai.handlers import CheckpointLoader, CheckpointSaver, TensorBoardStatsHandler, from_engine
from torch import nn

logger = logging.getLogger(__name__)


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest ``*.pt`` written by the CheckpointSaver in ``checkpoint_dir``, if any."""
    files = sorted(Path(checkpoint_dir).glob("*.pt"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def prepare_training(trainer: Engine, network: nn.Module, optimizer, lr_scheduler, checkpoint_dir: str | Path,
                     resume: bool = False, tensorboard: bool = False, output_dir: str | Path = "eval") -> None:
    """Attach checkpointing and what the switches ask for, before ``trainer.run()``.

    Every epoch the network, optimiser, schedule and trainer state are saved to
    ``checkpoint_dir`` (the newest only, plus ``final.pt``). Done here rather than in the
    config's handler list because the saver must hold the trainer that holds the handlers.

    Args:
        resume: continue from the newest checkpoint in ``checkpoint_dir`` (epoch, optimiser and
            schedule included), so a stopped run finishes where it would have.
        tensorboard: log the training loss for TensorBoard into ``output_dir/tensorboard``.
    """
    save_dict = {"network": network, "optimizer": optimizer, "lr_scheduler": lr_scheduler, "trainer": trainer}
    if resume:
        path = latest_checkpoint(checkpoint_dir)
        if path is None:
            raise FileNotFoundError(f"resume=True but no checkpoint in {checkpoint_dir}")
        # GaLore's projector objects are in the optimizer state; let weights_only loading accept them.
        from ..optimizers.galore import allow_galore_state_in_checkpoints

        allow_galore_state_in_checkpoints()
        CheckpointLoader(load_path=str(path), load_dict=save_dict, map_location="cpu").attach(trainer)
        logger.info("resuming from %s", path)
    if tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError as exc:
            raise ImportError("tensorboard=True needs the tensorboard package: pip install 'medsaga[tracking]'") from exc
        TensorBoardStatsHandler(log_dir=str(Path(output_dir) / "tensorboard"), tag_name="train_loss",
                                output_transform=from_engine(["loss"], first=True)).attach(trainer)
    # Built on every rank: ignite's saver synchronises ranks when constructed and writes on rank 0 only.
    CheckpointSaver(save_dir=str(checkpoint_dir), save_dict=save_dict, save_interval=1, n_saved=1, save_final=True,
                    final_filename="final.pt").attach(trainer)
