"""Models: the cosine head's formula, the CNN on 8x8 and 28x28 images, refusals, and runs on image data."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from xentlab.lab.models import CosineHead, build_model
from xentlab.lab.run import train
from xentlab.train import CONFIG_DIR


def test_cosine_head_gives_the_cosine_of_features_and_class_weights():
    torch.manual_seed(0)
    head = CosineHead(6, 4).double()
    h = torch.randn(5, 6, dtype=torch.float64)
    w = head.weight.detach()
    expected = torch.tensor([[float(torch.dot(hi, wc) / (hi.norm() * wc.norm())) for wc in w] for hi in h],
                            dtype=torch.float64)
    torch.testing.assert_close(head(h), expected, rtol=1e-12, atol=1e-12)
    # Only directions count: rescaling a sample's features (or a class's weights) changes no logit.
    torch.testing.assert_close(head(h * torch.rand(5, 1, dtype=torch.float64) * 10), expected)
    assert torch.autograd.gradcheck(head, (h.requires_grad_(),))


@pytest.mark.parametrize(("name", "params", "in_features"), [
    ("mlp", {"hidden_sizes": [8]}, 20), ("linear", {}, 20), ("cnn", {}, 64), ("cnn", {"channels": [4]}, 784),
])
@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_every_model_takes_either_head(name, params, in_features, head):
    torch.manual_seed(0)
    model = build_model(name, in_features=in_features, num_outputs=3, head=head, **params)
    logits = model(torch.randn(7, in_features))
    assert logits.shape == (7, 3)
    last = list(model.modules())[-1]
    assert isinstance(last, CosineHead if head == "cosine" else torch.nn.Linear)
    if head == "cosine":
        assert logits.abs().max() <= 1 + 1e-6
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_cnn_sees_images_not_a_row_of_pixels():
    # A conv net is translation-equivariant before its global pooling: shifting a blob on a blank
    # image leaves the pooled features (and logits) almost unchanged; a pixel permutation does not.
    torch.manual_seed(0)
    model = build_model("cnn", in_features=784, num_outputs=4, channels=[8]).eval()
    image = torch.zeros(1, 28, 28)
    image[0, 8:12, 8:12] = 1.0
    shifted = torch.roll(image, shifts=(6, 6), dims=(1, 2))
    logits, logits_shifted = model(image.flatten(1)), model(shifted.flatten(1))
    torch.testing.assert_close(logits, logits_shifted, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "params", "fragments"), [
    ("cnn", {"in_features": 20}, ["model=cnn", "data=digits", "data=mnist", "20 features"]),
    ("cnn", {"in_features": 64, "channels": [4, 4, 4, 4]}, ["side >= 2^len(model.channels) = 16", "64"]),
    ("cnn", {"in_features": 64, "channels": [4, 0]}, ["model.channels", "[4, 0]"]),
    ("mlp", {"in_features": 5, "head": "arcface"}, ["model.head", "linear, cosine", "'arcface'"]),
    ("cnn", {"in_features": 64, "dropout": 1.0}, ["model.dropout", "1.0"]),
    ("resnet", {"in_features": 64}, ["resnet", "mlp, linear, cnn"]),
    # `model.hidden_sizes=abc` on the command line: a string, not "'<' not supported between str and int".
    ("mlp", {"in_features": 5, "hidden_sizes": "abc"}, ["model.hidden_sizes", "list of positive", "'abc'"]),
    ("mlp", {"in_features": 5, "hidden_sizes": [8, 0]}, ["model.hidden_sizes", "[8, 0]"]),
])
def test_bad_model_settings_are_refused_naming_the_key(name, params, fragments):
    with pytest.raises(ValueError) as error:
        build_model(name, num_outputs=3, **params)
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))


@pytest.mark.parametrize("overrides", [
    ["data=digits", "model=cnn", "model.channels=[8]"],
    # MNIST on a subsample (60 images per digit) under the long-tail protocol, with the cosine head.
    ["data=mnist", "data.max_per_class=60", "data.imbalance_ratio=10", "data.min_class_samples=2",
     "model=cnn", "model.channels=[4,8]", "model.head=cosine"],
])
def test_the_cnn_trains_on_image_datasets(tmp_path, overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, "trainer.max_epochs=1",
                                                                  "trainer.log_every_n_steps=1"])
    (record,) = train(cfg, tmp_path)
    assert record["status"] == "completed" and record["epochs"] == 1
    assert 0 <= record["metrics"]["test/balanced_accuracy"] <= 1
