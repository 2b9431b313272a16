"""Small classifiers: a linear model and an MLP for tabular data, a small CNN for square grey images; each
ends in a `linear` head (logits = W h + b) or a `cosine` one (logits = cosines, as LDAM uses)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MODELS = ("mlp", "linear", "cnn")
HEADS = ("linear", "cosine")


class CosineHead(nn.Module):
    """logits_c = cos(h, w_c) = <h / |h|, w_c / |w_c|>, in [-1, 1], no bias (normalised features and
    weights, Cao et al. 2019). A loss meant for it scales the cosines (LDAM's s = 30); plain CE on raw
    cosines cannot make any probability larger than e / (e + (C - 1) / e)."""

    def __init__(self, in_features: int, num_outputs: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_outputs, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).T


def make_head(name: str, in_features: int, num_outputs: int) -> nn.Module:
    """The last layer, mapping `in_features` features to `num_outputs` logits: `linear` or `cosine`."""
    if name not in HEADS:
        raise ValueError(f"model.head must be one of {', '.join(HEADS)}, got {name!r}")
    return nn.Linear(in_features, num_outputs) if name == "linear" else CosineHead(in_features, num_outputs)


def mlp(in_features: int, num_outputs: int, hidden_sizes: Sequence[int] = (64, 64), dropout: float = 0.0,
        head: str = "linear") -> nn.Module:
    """Fully connected network: (Linear → ReLU → Dropout) per hidden size, then the head to the logits."""
    if isinstance(hidden_sizes, str) or any(isinstance(h, bool) or not isinstance(h, int) or h < 1
                                            for h in hidden_sizes):
        raise ValueError(f"model.hidden_sizes must be a list of positive integers (e.g. [64, 64]), "
                         f"got {hidden_sizes!r}")
    _check_dropout(dropout)
    layers: list[nn.Module] = []
    width = in_features
    for hidden in hidden_sizes:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(make_head(head, width, num_outputs))
    return nn.Sequential(*layers)


def linear(in_features: int, num_outputs: int, head: str = "linear") -> nn.Module:
    """Multinomial logistic regression, logits = x W^T + b (or the cosines of x and each w_c)."""
    return make_head(head, in_features, num_outputs)


def cnn(in_features: int, num_outputs: int, channels: Sequence[int] = (16, 32), dropout: float = 0.0,
        head: str = "linear") -> nn.Module:
    """A small convolutional net for square grey images given as flat rows of side^2 pixels (digits' 8x8,
    mnist's 28x28): per entry of `channels`, Conv 3x3 → BatchNorm → ReLU → MaxPool 2x2, then global
    average pooling, dropout and the head."""
    side = math.isqrt(in_features)
    if side * side != in_features or side < 2 ** len(channels):
        raise ValueError(f"model=cnn takes square grey images of side >= 2^len(model.channels) = "
                         f"{2 ** len(channels)} as flat rows (e.g. data=digits, 8x8, or data=mnist, 28x28); "
                         f"this dataset has {in_features} features")
    if not channels or any(c < 1 for c in channels):
        raise ValueError(f"model.channels must be a non-empty list of positive integers, "
                         f"got {list(channels)}")
    _check_dropout(dropout)
    layers: list[nn.Module] = [nn.Unflatten(1, (1, side, side))]
    width = 1
    for out in channels:
        layers += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(),
                   nn.MaxPool2d(2)]
        width = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(make_head(head, width, num_outputs))
    return nn.Sequential(*layers)


def _check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")


def build_model(name: str, in_features: int, num_outputs: int, **params) -> nn.Module:
    """Model named `name` (one of MODELS) mapping `in_features` inputs to `num_outputs` logits."""
    builders = {"mlp": mlp, "linear": linear, "cnn": cnn}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return builders[name](in_features, num_outputs, **params)
