"""checkpoint=best: each run is tested with the weights of its best validation epoch, read back from the
run's own TensorBoard curve; checkpoint=last is unchanged; bad settings are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from xentlab.lab.run import train
from xentlab.lab.validation import ConfigError, check_config
from xentlab.train import CONFIG_DIR

TINY = ["data.n_samples=600", "model.hidden_sizes=[16]", "trainer.max_epochs=6"]


def config(*overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[*TINY, *overrides])


def val_curve(run_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from xentlab.lab.board import board_tag

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [e.value for e in events.Scalars(board_tag("val/balanced_accuracy"))]


@pytest.fixture(scope="module", params=[1, 2], ids=["single", "batch"])
def best(request, tmp_path_factory):
    """(seeds, folder, records) of a checkpoint=best run: one seed alone, or two as a seed batch."""
    folder = tmp_path_factory.mktemp("best")
    return request.param, folder, train(config("checkpoint=best", f"seeds={request.param}"), folder)


def test_best_tests_the_weights_of_the_best_validation_epoch(tmp_path, best):
    seeds, folder, records = best
    last = train(config(f"seeds={seeds}"), tmp_path / "last")
    epochs = [int(record["metrics"]["val/selected_epoch"]) for record in records]
    assert min(epochs) < 6  # seed 0 peaks at epoch 4 here: the choice is not the last epoch by default
    for k, (chosen, plain) in enumerate(zip(records, last, strict=True)):
        curve = val_curve(folder / (f"seed={k}" if seeds > 1 else ""))
        # One point per epoch, then the chosen weights validated again at the end.
        per_epoch, again = curve[:-1], curve[-1]
        assert len(per_epoch) == 6
        epoch = epochs[k]
        assert epoch == 1 + per_epoch.index(max(per_epoch))  # the first epoch reaching the maximum
        assert again == pytest.approx(max(per_epoch))
        assert chosen["metrics"]["val/balanced_accuracy"] == pytest.approx(max(per_epoch))
        # The same training run: its last epoch is what checkpoint=last validates and tests.
        assert plain["metrics"]["val/balanced_accuracy"] == pytest.approx(per_epoch[-1], abs=1e-6)
        assert "val/selected_epoch" not in plain["metrics"]
        if epoch < 6:
            assert chosen["metrics"]["test/balanced_accuracy"] != plain["metrics"]["test/balanced_accuracy"]


def test_checkpoint_settings_are_checked():
    with pytest.raises(ConfigError, match="checkpoint must be last .* or best"):
        check_config(config("checkpoint=first"))
    with pytest.raises(ConfigError, match="must be a val/ metric"):
        check_config(config("checkpoint=best", "objective=test/balanced_accuracy"))
    check_config(config("checkpoint=best", "objective=val/ece"))


def test_a_resumed_run_chooses_among_all_its_epochs(tmp_path, best):
    seeds, _, whole = best
    train(config("checkpoint=best", f"seeds={seeds}", "trainer.max_epochs=4"), tmp_path / "resumed")
    resumed = train(config("checkpoint=best", f"seeds={seeds}", "ckpt_path=last"), tmp_path / "resumed")
    for one, other in zip(whole, resumed, strict=True):
        assert one["metrics"]["val/selected_epoch"] == other["metrics"]["val/selected_epoch"]
        tested = other["metrics"]["test/balanced_accuracy"]
        assert one["metrics"]["test/balanced_accuracy"] == pytest.approx(tested, abs=1e-6)
    if seeds > 1:  # each seed's own checkpoint carries its own kept weights, in a single run's names
        from xentlab.lab.checkpoint import load_checkpoint

        kept = load_checkpoint(tmp_path / "resumed" / "seed=1" / "checkpoints" / "last.ckpt")["callbacks"]
        assert kept["BestEpoch"]["epochs"] == [int(resumed[1]["metrics"]["val/selected_epoch"])]
        assert all(not name.startswith("model.") for name in kept["BestEpoch"]["state"])
