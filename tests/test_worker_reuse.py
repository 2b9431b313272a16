"""A process that runs several jobs in a row (a joblib worker of a sweep) must not carry state from one
job's test epoch (inference mode) into the next job's training."""

from __future__ import annotations

import pytest
import torch

from xentlab import functional as xF


@pytest.mark.parametrize("loss", [xF.mse_loss, xF.cross_entropy])
def test_losses_train_after_a_larger_batch_was_evaluated_in_inference_mode(loss):
    with torch.inference_mode():  # Lightning's test loop: grows the fused path's cached workspace
        loss(torch.randn(5000, 10), torch.randint(0, 10, (5000,)))
    x = torch.randn(3, 10, requires_grad=True)
    loss(x, torch.tensor([0, 1, 2])).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
