"""K models of one architecture trained as one: parameters stacked along a leading seed axis.

Small models leave a Lightning step mostly loop overhead, and a sweep pays each job's start-up again;
K seeds in one process share both. Each seed stays an independent run: its own data, initialisation,
loss, optimizer state and metrics. Its parameters are slice k of tensors stacked along dim 0, and the
model runs once per step on all K. The step minimises the sum of the K losses; seed k's loss depends
only on slice k, so slice k's gradient is exactly what seed k alone would get, and element-wise
optimizers (Adam, SGD, ...) then update every slice as its own run would.

At K = 1 everything here passes through: the model is the plain model, the data the plain data module
(so DDP shards it as usual), and a batch only gains a seed axis of length 1.
"""

from __future__ import annotations

import copy
import functools

import pytorch_lightning as pl
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

# Optimizers whose update of each parameter element depends only on that element's own gradient and
# state, so an update of stacked parameters is K independent updates. (L-BFGS's line search, or
# layer-wise trust ratios as in LAMB/LARS, would couple the seeds.)
ELEMENTWISE_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax,
                          torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adagrad,
                          torch.optim.Adadelta)


def check_optimizer(factory) -> None:
    """Refuse an optimizer whose update could couple the seeds of a batch."""
    cls = factory.func if isinstance(factory, functools.partial) else factory
    if not (isinstance(cls, type) and issubclass(cls, ELEMENTWISE_OPTIMIZERS)):
        names = ", ".join(c.__name__ for c in ELEMENTWISE_OPTIMIZERS)
        raise ValueError(f"seeds > 1 trains the seeds as one stacked model, which needs an optimizer that "
                         f"updates each parameter element on its own; {getattr(cls, '__name__', cls)!r} is "
                         f"not one known to. Use one of {names}, or seeds=1")


class StackedModel(nn.Module):
    """K models of one architecture as one module: every parameter and buffer stacked along dim 0.

    forward maps inputs (K, B, ...) to outputs (K, B, ...), model k applied to x[k]: vmap over
    functional_call, so any architecture works without a batched rewrite. A plain stack of Linear and
    ReLU layers (the default MLP, the linear model) takes batched matmuls instead, h <- baddbmm(b, h, W^T):
    the same arithmetic without vmap's per-op dispatch, ~40% of its time here. Dropout draws a different
    mask per seed (vmap's randomness="different"), from the global generator: each seed is still an
    independent run, but not bit-identical to the same seed trained alone.
    """

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        shapes = [[(n, t.shape) for n, t in m.state_dict().items()] for m in models]
        if any(s != shapes[0] for s in shapes):
            raise ValueError("the models of a seed batch must share one architecture")
        params, buffers = stack_module_state(models)
        # models[0] serves as the skeleton; its own tensors are replaced by the stacked ones.
        self.model = copy.deepcopy(models[0])
        for name, value in params.items():
            owner, leaf = self._owner(name)
            setattr(owner, leaf, nn.Parameter(value.detach().clone()))
        for name, value in buffers.items():
            owner, leaf = self._owner(name)
            owner.register_buffer(leaf, value.clone())
        self.num_models = len(models)
        self._forward = vmap(self._one, in_dims=(0, 0, 0), randomness="different")
        layers = list(self.model) if isinstance(self.model, nn.Sequential) else [self.model]
        self._plain = all(type(layer) in (nn.Linear, nn.ReLU) for layer in layers)
        self._layers = layers

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        prefix, _, leaf = name.rpartition(".")
        return (self.model.get_submodule(prefix) if prefix else self.model), leaf

    def _one(self, params, buffers, x):
        return functional_call(self.model, (params, buffers), (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._plain and x.dim() == 3:
            for layer in self._layers:
                if type(layer) is nn.ReLU:
                    x = torch.relu(x)
                elif layer.bias is None:
                    x = torch.bmm(x, layer.weight.transpose(1, 2))
                else:
                    x = torch.baddbmm(layer.bias.unsqueeze(1), x, layer.weight.transpose(1, 2))
            return x
        return self._forward(dict(self.model.named_parameters()), dict(self.model.named_buffers()), x)


def stacking_problem(model: nn.Module, x: torch.Tensor) -> str | None:
    """Why copies of `model` cannot train as one `StackedModel`, or None when they can: two copies run
    forward and backward on the batch `x` in training mode, the original left untouched. vmap refuses,
    for instance, a forward that branches on a tensor's value (`.item()`, `if x.sum() > 0`)."""
    try:
        stacked = StackedModel([copy.deepcopy(model).train() for _ in range(2)])
        stacked(torch.stack([x, x])).float().sum().backward()
    except Exception as error:  # whatever the model's own code raises under vmap
        lines = str(error).strip().splitlines()
        return f"{type(error).__name__}: {lines[0] if lines else ''}"
    return None


def stack_models(models: list[nn.Module]) -> nn.Module:
    """One model for the K seeds: the model itself at K = 1, else a StackedModel."""
    return models[0] if len(models) == 1 else StackedModel(models)


def stacked_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Outputs (K, B, ...) of `stack_models`' model on inputs (K, B, ...)."""
    return model(x) if isinstance(model, StackedModel) else model(x[0]).unsqueeze(0)


def seed_axis(batch, num_seeds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as (x, y) with the seed axis first: a stacked batch as it is, a single run's gains one."""
    x, y = batch
    return (x, y) if num_seeds > 1 else (x.unsqueeze(0), y.unsqueeze(0))


def clip_grad_norm_per_seed(stacked: list[torch.Tensor], own: list[list[torch.Tensor]],
                            max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_'s rule per seed, scale = min(1, max_norm / (norm + 1e-6)), where seed
    k's norm runs over its slice of every stacked gradient in `stacked` and its own gradients `own[k]`."""
    device = stacked[0].device if stacked else torch.device("cpu")
    squares = sum((g.float().flatten(1).pow(2).sum(1) for g in stacked), torch.zeros(len(own), device=device))
    squares = squares + torch.stack([sum((g.float().pow(2).sum() for g in grads),
                                         torch.zeros((), device=device)) for grads in own])
    scale = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
    for g in stacked:
        g.mul_(scale.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))
    for k, grads in enumerate(own):
        for g in grads:
            g.mul_(scale[k].to(g.dtype))


# --- data: K data modules, one batch of K slices per step ------------------------------------------------

class StackedBatches:
    """Zips K loaders of equal length: each step yields x (K, B, ...) and y (K, B, ...), slice k from
    loader k, so every seed sees exactly the batches its own run would."""

    def __init__(self, loaders: list):
        self.loaders = loaders

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self):
        for batches in zip(*self.loaders, strict=True):
            xs, ys = zip(*batches, strict=True)
            yield torch.stack(xs), torch.stack(ys)


class StackedData(pl.LightningDataModule):
    """The seeds' own data modules behind one LightningDataModule that serves stacked batches."""

    def __init__(self, datamodules: list):
        super().__init__()
        first = datamodules[0]
        for k, dm in enumerate(datamodules):
            for attribute in ("task", "num_classes", "num_features"):
                if getattr(dm, attribute) != getattr(first, attribute):
                    raise ValueError(f"seed batch: seed {k}'s data has {attribute}={getattr(dm, attribute)}, "
                                     f"the first seed's {getattr(first, attribute)}")
            for name, (_, y) in dm.splits.items():
                if len(y) != len(first.splits[name][1]):
                    raise ValueError(
                        f"seed batch: the {name} split has {len(y)} samples for seed index {k} but "
                        f"{len(first.splits[name][1])} for the first seed; a batch trains its seeds in lock "
                        "step, so every seed's splits must have the same sizes (use seeds=1 for this data)")
        self.datamodules = datamodules
        self.task, self.num_classes, self.num_features = first.task, first.num_classes, first.num_features

    def train_dataloader(self):
        return StackedBatches([dm.train_dataloader() for dm in self.datamodules])

    def val_dataloader(self):
        return StackedBatches([dm.val_dataloader() for dm in self.datamodules])

    def test_dataloader(self):
        return StackedBatches([dm.test_dataloader() for dm in self.datamodules])

    def state_dict(self) -> dict:
        """Each seed's data module's state (its training stream's position), in seed order."""
        return {"seeds": [dm.state_dict() for dm in self.datamodules]}

    def load_state_dict(self, state_dict: dict) -> None:
        for dm, state in zip(self.datamodules, state_dict.get("seeds", []), strict=False):
            dm.load_state_dict(state)


def stack_data(datamodules: list) -> pl.LightningDataModule:
    """One data module for the K seeds: the seed's own at K = 1, else a StackedData."""
    return datamodules[0] if len(datamodules) == 1 else StackedData(datamodules)


# --- losses: one call for all seeds where that is the seeds' own calls -----------------------------------

def interchangeable(losses: list[nn.Module]) -> bool:
    """Whether the seeds' losses are one function whose mean is a mean of rows: two or more of one class
    that says so (`averages_rows`, which the built-ins declare; a plugin loss without it keeps per-seed
    calls) with `reduction="mean"` to switch, equal plain settings and buffers, and no parameters,
    submodules or epoch hook (which could make them differ later)."""
    first = losses[0]
    if len(losses) < 2 or getattr(first, "averages_rows", False) is not True \
            or getattr(first, "reduction", None) != "mean" \
            or callable(getattr(first, "on_train_epoch_start", None)):
        return False

    def settings(loss: nn.Module) -> dict | None:
        plain = {k: v for k, v in vars(loss).items() if not k.startswith("_") and k != "training"}
        if any(not isinstance(v, (bool, int, float, str, type(None))) for v in plain.values()):
            return None
        if loss._parameters or loss._modules:
            return None
        return plain

    reference = settings(first)
    if reference is None:
        return False
    for loss in losses[1:]:
        if type(loss) is not type(first) or settings(loss) != reference \
                or loss._buffers.keys() != first._buffers.keys():
            return False
        for name, value in loss._buffers.items():
            other = first._buffers[name]
            if (value is None) != (other is None) or (value is not None and not torch.equal(value, other)):
                return False
    return True


def row_means(loss: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(K,) the mean over each seed's rows of `loss`'s reduction="none" values on all K*B rows of `logits`
    (K, B, C) at once, rows whose target is the loss's `ignore_index` left out as PyTorch's mean does."""
    k, b = y.shape[:2]
    loss.reduction = "none"
    try:
        values = loss(logits.flatten(0, 1), y.flatten(0, 1))
    finally:
        loss.reduction = "mean"
    values = values.reshape(k, b, -1)
    ignore = getattr(loss, "ignore_index", None)
    if isinstance(ignore, int) and y.dim() == 2 and not y.is_floating_point():
        kept = (y != ignore).sum(1).to(values.dtype)
        return values.sum((1, 2)) / (kept * values.shape[2])
    return values.mean((1, 2))
