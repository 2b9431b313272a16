"""The LightningModule: forward the model, apply the loss it was given, log metrics. No loss math here."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torchmetrics
from torch import nn


class ClassifierModule(pl.LightningModule):
    """Trains `model` with `loss(logits, target)`; logs `<stage>/loss` and `<stage>/accuracy` per epoch."""

    def __init__(self, model: nn.Module, loss: nn.Module, *, task: str, num_classes: int,
                 optimizer: Callable[..., torch.optim.Optimizer], run_params: dict | None = None):
        super().__init__()
        # The run's flattened config (loss and its parameters, dataset, imbalance ratio, seed, ...),
        # for the TensorBoard HParams view.
        self.run_params = dict(run_params or {})
        self.model, self.loss, self.task, self.num_classes = model, loss, task, num_classes
        self.optimizer_factory = optimizer
        # micro average: plain accuracy (torchmetrics' multiclass default is macro, i.e. balanced).
        self.accuracy = nn.ModuleDict({
            f"{stage}_": torchmetrics.Accuracy(task="multiclass", num_classes=num_classes, average="micro")
            for stage in ("train", "val", "test")
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        accuracy = self.accuracy[f"{stage}_"]  # ModuleDict keys may not shadow nn.Module.train
        accuracy(logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=len(x))
        self.log(f"{stage}/accuracy", accuracy, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        return self.optimizer_factory(self.parameters())
