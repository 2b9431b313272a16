"""Small classifiers for tabular data: a linear model and an MLP."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

MODELS = ("mlp", "linear")


def mlp(
    in_features: int, num_outputs: int, hidden_sizes: Sequence[int] = (64, 64), dropout: float = 0.0
) -> nn.Module:
    """Fully connected network: (Linear → ReLU → Dropout) per hidden size, then a Linear to the logits."""
    if any(h < 1 for h in hidden_sizes):
        raise ValueError(f"model.hidden_sizes must be positive integers, got {list(hidden_sizes)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")
    layers: list[nn.Module] = []
    width = in_features
    for hidden in hidden_sizes:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


def linear(in_features: int, num_outputs: int) -> nn.Module:
    """Multinomial logistic regression: logits = x W^T + b."""
    return nn.Linear(in_features, num_outputs)


def build_model(name: str, in_features: int, num_outputs: int, **params) -> nn.Module:
    """Model named `name` (one of MODELS) mapping `in_features` inputs to `num_outputs` logits."""
    builders = {"mlp": mlp, "linear": linear}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return builders[name](in_features, num_outputs, **params)
