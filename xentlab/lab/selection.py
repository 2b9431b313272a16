"""`checkpoint=best`: test each run with its weights from the validation epoch where `objective` was best,
instead of the last epoch's.

A loss that peaks early and then overfits loses, under last-epoch testing, to one that peaks late: the
comparison then measures the schedule as much as the loss. Choosing the epoch on the validation split
keeps the test split untouched by the choice. `BestEpoch` keeps a copy of the weights of each run's best
validation epoch so far (for a seed batch, each seed's own slice of the stacked weights, since every seed
peaks at its own epoch); after fitting, `restore_best` puts them back and validates once more, so the
record's `val/` metrics, the validation logits the post-hoc fits (temperature scaling, logit adjustment)
use, and the test all belong to the chosen epoch. The record's `val/selected_epoch` says which (1-based).
The kept weights are part of the run's checkpoint (each seed's own in its split checkpoint), so a resumed
run chooses among all its epochs. TensorBoard's validation curves end with one extra point at the last
step: the chosen weights validated again.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from xentlab.lab.report.options import higher_is_better

SELECTED_EPOCH = "val/selected_epoch"


class BestEpoch(pl.Callback):
    """Keeps, per run of the module (one, or one per seed of a batch), the weights of the validation epoch
    with the best `objective` (ties keep the earlier epoch; non-finite values never count)."""

    def __init__(self, objective: str):
        self.objective, self.higher = objective, higher_is_better(objective)
        self.best: list[float] | None = None
        self.epochs: list[int] | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        values = module.objective_values(self.objective)
        current = module.model.state_dict()
        if self.state is None:
            self.best, self.epochs = [math.nan] * len(values), [0] * len(values)
            self.state = {name: value.detach().clone() for name, value in current.items()}
        stacked = hasattr(module.model, "num_models")  # a seed batch: slice k of every tensor is seed k's
        for k, value in enumerate(values):
            if not math.isfinite(value) or not self._better(value, self.best[k]):
                continue
            self.best[k], self.epochs[k] = value, trainer.current_epoch + 1
            for name, tensor in current.items():
                if stacked:
                    self.state[name][k].copy_(tensor[k].detach())
                else:
                    self.state[name].copy_(tensor.detach())

    def _better(self, value: float, best: float) -> bool:
        if math.isnan(best):
            return True
        return value > best if self.higher else value < best

    # The kept weights travel in the run's checkpoint, so a resumed run (`ckpt_path=last`) still chooses
    # among all its epochs, not only those after the resume.
    # A resume may change `objective`: then the kept epoch was the best by another metric, and the choice
    # starts again from the resumed epoch.
    def state_dict(self) -> dict:
        return {"objective": self.objective, "best": self.best, "epochs": self.epochs, "state": self.state}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("objective") == self.objective:
            self.best, self.epochs, self.state = state_dict["best"], state_dict["epochs"], state_dict["state"]

    def restore(self, module: pl.LightningModule) -> None:
        """Load the kept weights into the module (a run that never validated keeps its last ones)."""
        if self.state is not None:
            module.model.load_state_dict(self.state)


def seed_part(state: dict, k: int) -> dict:
    """Seed k's part of a seed batch's `BestEpoch` state, as the callback of seed k trained alone holds it
    (the single model's names: the stacked model's without their `model.` prefix)."""
    if state.get("state") is None:
        return state
    weights = {name.removeprefix("model."): value[k].clone() for name, value in state["state"].items()}
    return {"objective": state.get("objective"), "best": [state["best"][k]], "epochs": [state["epochs"][k]],
            "state": weights}


def best_epoch_callback(cfg) -> BestEpoch | None:
    """The callback for `checkpoint=best`, None for `checkpoint=last`."""
    return BestEpoch(cfg.objective) if cfg.get("checkpoint", "last") == "best" else None


def restore_best(trainer: pl.Trainer, module: pl.LightningModule, datamodule) -> list[int] | None:
    """After fit under `checkpoint=best`: load each run's best weights and validate them once more (the
    logged `val/` metrics and kept validation logits become the chosen epoch's). Returns each run's selected
    epoch (1-based), None under `checkpoint=last`."""
    best = next((c for c in trainer.callbacks if isinstance(c, BestEpoch)), None)
    if best is None or best.epochs is None:
        return None
    best.restore(module)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return list(best.epochs)
