"""Classifiers: a linear model and an MLP for tabular data, a small CNN for square grey images, the CIFAR
ResNet-32 of the long-tail papers; each ends in a `linear` head (logits = W h + b) or a `cosine` one
(logits = cosines, as LDAM uses). Any other nn.Module comes by its import path (`_target_`), timm's
models through `timm_model`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MODELS = ("mlp", "linear", "cnn", "resnet32")
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


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a ReLU between and after the residual sum; a block that halves the
    resolution and doubles the width takes a parameter-free shortcut (He et al. 2016's option A, as the
    CIFAR ResNets of Cao et al. 2019 do): every other pixel, the new channels zero."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = (planes - in_planes) // 2 if stride != 1 or in_planes != planes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. 2016 (6n + 2 layers: a 16-channel 3x3 conv, three stages of n basic
    blocks with 16, 32, 64 channels, global average pooling, the head), as the long-tail papers train it
    (Cao et al. 2019's `resnet32`: n = 5, 0.46 M parameters for 10 classes). Convolutions and a linear
    head start from Kaiming-normal weights, as in their code."""

    def __init__(self, blocks: int, num_outputs: int, in_channels: int = 3, head: str = "linear"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, width = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            stages.append(nn.Sequential(*[BasicBlock(width if i == 0 else planes, planes,
                                                     stride if i == 0 else 1) for i in range(blocks)]))
            width = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.head = make_head(head, 64, num_outputs)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.head(out.mean((2, 3)))


def resnet32(input_shape: Sequence[int], num_outputs: int, head: str = "linear") -> nn.Module:
    """ResNet-32 for CIFAR-sized images (N, C, H, W) (`CifarResNet` with 5 blocks per stage)."""
    if len(input_shape) != 3:
        raise ValueError(f"model=resnet32 takes images (channels, height, width), e.g. data=cifar10_lt or "
                         f"data=image_folder; this data's samples have shape {tuple(input_shape)}")
    return CifarResNet(5, num_outputs, in_channels=input_shape[0], head=head)


def custom_model(target: str, input_shape: Sequence[int], num_outputs: int, **params) -> nn.Module:
    """The nn.Module built by the class or factory at `target` (`pkg.module.Class`) with `params` and
    `num_classes`, plus `in_features` (rows: the number of features) or `in_channels` (images (C, H, W):
    C) when it takes them (or **kwargs)."""
    import inspect

    from xentlab.lab.sources import import_object

    build = import_object(target, "model._target_")
    try:
        accepted = inspect.signature(build).parameters
    except (TypeError, ValueError):
        accepted = {}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    if "num_classes" not in accepted and not open_ended:
        raise ValueError(f"model._target_={target} must take num_classes (the number of outputs); it takes: "
                         f"{', '.join(accepted) or 'nothing'}")
    data_sizes = {"in_features": int(input_shape[0])} if len(input_shape) == 1 else \
        {"in_channels": int(input_shape[0])} if len(input_shape) == 3 else {}
    given = {key: value for key, value in data_sizes.items() if key in accepted or open_ended}
    model = build(**params, num_classes=num_outputs, **given)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model._target_={target} returned {type(model).__name__}, not a torch nn.Module")
    return model


def timm_model(name: str, num_classes: int, in_channels: int | None = None, pretrained: bool = False,
               **params) -> nn.Module:
    """timm's model `name` (`timm.create_model`) with `num_classes` outputs and `in_channels` input
    channels; pretrained weights only when asked (they are downloaded)."""
    try:
        import timm
    except ImportError as error:
        raise ImportError("model=timm needs the optional extra: pip install 'xentlab[timm]' (or pip "
                          "install timm, which brings torchvision: pick the build that matches your torch)") \
            from error
    if in_channels is not None:
        params["in_chans"] = in_channels
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **params)


def build_model(name: str | None = None, in_features: int | None = None, num_outputs: int = 2, *,
                input_shape: Sequence[int] | None = None, _target_: str | None = None,
                **params) -> nn.Module:
    """The model mapping inputs of one sample's shape `input_shape` ((features,) or (channels, height,
    width); `(in_features,)` when not given) to `num_outputs` logits: one of MODELS by `name`, or the
    module built by the class or factory at `_target_` (`custom_model`). Images given to `mlp`, `linear`
    or `cnn` (grey square ones) are flattened first."""
    shape = tuple(input_shape) if input_shape is not None else (in_features,)
    if _target_ is not None:
        if name in MODELS:  # `+model._target_=...` on a built-in: its settings would go to the class
            raise ValueError(f"model._target_={_target_} cannot extend model={name}, whose settings your "
                             f"model does not take; choose model=custom model._target_={_target_} (its own "
                             "arguments as model.<arg>=...)")
        # A factory's own `name` (timm's model name) is one of its parameters.
        named = {} if name is None else {"name": name}
        return custom_model(_target_, shape, num_outputs, **params, **named)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}, or give your own: "
                         "model=custom model._target_=<pkg.module.Class>, or model=timm model.name=<name>")
    if name == "resnet32":
        return resnet32(shape, num_outputs, **params)
    flat = int(math.prod(shape))
    model = {"mlp": mlp, "linear": linear, "cnn": cnn}[name](flat, num_outputs, **params)
    if len(shape) > 1:
        model = nn.Sequential(nn.Flatten(), *(model if isinstance(model, nn.Sequential) else [model]))
    return model
