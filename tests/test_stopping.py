"""TrainUntilPlateau on real ignite engines: a trainer that validates every epoch with an
evaluator whose key metric follows a scripted curve (the curve stands in for a network's
validation Dice, which is what the handler reads)."""

import json
import time

import pytest
from ignite.engine import Engine, Events

from medsaga_components.engine import TrainUntilPlateau


def _engines(curve, step_seconds=0.0):
    trainer = Engine(lambda engine, batch: time.sleep(step_seconds))
    evaluator = Engine(lambda engine, batch: None)

    @evaluator.on(Events.COMPLETED)
    def score(engine):  # registered before the handler, as MONAI's metric handlers are
        engine.state.key_metric_name = "val_mean_dice"
        engine.state.metrics = {"val_mean_dice": curve[min(trainer.state.epoch, len(curve)) - 1]}

    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: evaluator.run([0]))
    return trainer, evaluator


def test_stops_after_patience_validations_without_gain(tmp_path):
    curve = [0.1, 0.5, 0.8, 0.801, 0.79, 0.80, 0.70, 0.95]  # a gain of 0.001 is below min_delta
    trainer, evaluator = _engines(curve)
    TrainUntilPlateau(evaluator, patience=4, min_delta=0.002, summary_path=tmp_path / "s.json").attach(trainer)
    trainer.run(range(5), max_epochs=50)
    assert trainer.state.epoch == 7  # a real gain at epoch 3, then four validations without one
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["steps"] == 35 and record["epochs"] == 7
    # the best score (the model kept) is epoch 4's, although its gain was too small to count
    assert record["best_epoch"] == 4 and record["best_validation"] == pytest.approx(0.801)
    assert record["stopped_by"] == "validation plateau: no gain above 0.002 in 4 validations after epoch 3"


def test_no_plateau_stop_before_validation_has_learned_something():
    """Small structures: validation 0.000 for many validations, then it starts to learn."""
    curve = [0.0] * 8 + [0.2, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.9]
    trainer, evaluator = _engines(curve)
    TrainUntilPlateau(evaluator, patience=4, min_score=0.05).attach(trainer)
    trainer.run(range(2), max_epochs=50)
    assert trainer.state.epoch == 15  # not 5: the plateau clock runs once something was learned
    trainer, evaluator = _engines([0.0] * 20)
    TrainUntilPlateau(evaluator, patience=4, min_score=0.05).attach(trainer)
    trainer.run(range(2), max_epochs=12)
    assert trainer.state.epoch == 12  # nothing learned: the step cap ends it


def test_patience_zero_trains_to_the_step_cap(tmp_path):
    trainer, evaluator = _engines([0.5] * 3)
    handler = TrainUntilPlateau(evaluator, patience=0, summary_path=tmp_path / "s.json")
    handler.attach(trainer)
    trainer.run(range(2), max_epochs=6)
    assert trainer.state.epoch == 6
    assert json.loads((tmp_path / "s.json").read_text())["stopped_by"] == "step cap (epochs)"


def test_time_cap_stops_at_the_end_of_an_epoch(tmp_path):
    trainer, evaluator = _engines([0.1 * i for i in range(1, 50)], step_seconds=0.02)
    TrainUntilPlateau(evaluator, patience=10, max_minutes=0.05 / 60, summary_path=tmp_path / "s.json").attach(trainer)
    trainer.run(range(3), max_epochs=40)  # 0.06 s an epoch against a 0.05 s cap
    assert trainer.state.epoch == 1
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["stopped_by"].startswith("time cap") and record["seconds"] >= 0.05


@pytest.mark.parametrize("kwargs, key", [({"patience": -1}, "patience"), ({"max_minutes": 0}, "max_minutes"),
                                         ({"max_minutes": "half an hour"}, "max_minutes")])
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        TrainUntilPlateau(Engine(lambda e, b: None), **kwargs)


def test_null_from_the_command_line_switches_a_limit_off():
    handler = TrainUntilPlateau(Engine(lambda e, b: None), patience="null", max_minutes="null")
    assert handler.patience == 0 and handler.max_seconds is None


def test_a_resumed_run_keeps_counting_from_the_saved_state():
    curve = [0.1, 0.5, 0.8, 0.79, 0.79, 0.79, 0.79, 0.79]
    first, first_eval = _engines(curve)
    handler = TrainUntilPlateau(first_eval, patience=4)
    handler.attach(first)
    first.run(range(2), max_epochs=5)  # two validations without a gain so far
    resumed, resumed_eval = _engines(curve)
    again = TrainUntilPlateau(resumed_eval, patience=4)
    again.load_state_dict(handler.state_dict())
    again.attach(resumed)
    resumed.load_state_dict({"epoch": 5, "epoch_length": 2, "max_epochs": 50})  # as a checkpoint restores it
    resumed.run(range(2))
    assert resumed.state.epoch == 7 and again.reference_epoch == 3
