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


# --- ResNet-32, models by import path, timm ---------------------------------------------------------------

def test_resnet32_is_the_papers_network():
    from xentlab.lab.models import CifarResNet

    model = build_model("resnet32", input_shape=(3, 32, 32), num_outputs=10)
    assert isinstance(model, CifarResNet)
    # 31 convolutions + the linear head = 32 weighted layers; 464 154 parameters at 10 classes (the 0.46 M
    # of Cao et al. 2019), 470 004 at 100.
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 31
    assert sum(p.numel() for p in model.parameters()) == 464_154
    assert sum(p.numel() for p in build_model("resnet32", input_shape=(3, 32, 32), num_outputs=100)
               .parameters()) == 470_004
    cosine = build_model("resnet32", input_shape=(3, 32, 32), num_outputs=10, head="cosine")
    assert isinstance(cosine.head, CosineHead)
    with pytest.raises(ValueError, match="model=resnet32 takes images"):
        build_model("resnet32", in_features=20, num_outputs=3)


def test_resnet32_takes_a_training_step():
    torch.manual_seed(0)
    model = build_model("resnet32", input_shape=(3, 32, 32), num_outputs=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    before = torch.nn.functional.cross_entropy(model(x), y)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert torch.nn.functional.cross_entropy(model(x), y).item() < before.item()


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
    from _fakedata import write_fake_cifar10

    return write_fake_cifar10(tmp_path_factory.mktemp("cifar"))


def compose_run(overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_resnet32_trains_an_epoch_on_fake_cifar10_lt(fake_cifar, tmp_path):
    cfg = compose_run(["data=cifar10_lt", f"data.root={fake_cifar}", "data.imbalance_ratio=100",
                       "model=resnet32", "optimizer=sgd", "trainer.max_epochs=1",
                       "trainer.log_every_n_steps=1"])
    (record,) = train(cfg, tmp_path)
    assert record["status"] == "completed" and record["epochs"] == 1
    assert 0 <= record["metrics"]["test/balanced_accuracy"] <= 1


@pytest.fixture(scope="module")
def nets_module(tmp_path_factory):
    """A module of the user's own: a model class taking num_classes and in_features, and a fake `timm`."""
    import sys
    import textwrap

    folder = tmp_path_factory.mktemp("nets")
    (folder / "my_nets.py").write_text(textwrap.dedent('''
        import torch

        built = []

        class Net(torch.nn.Module):
            def __init__(self, in_features, num_classes, width=16):
                super().__init__()
                built.append({"in_features": in_features, "num_classes": num_classes, "width": width})
                self.body = torch.nn.Sequential(torch.nn.Linear(in_features, width), torch.nn.Tanh(),
                                                torch.nn.Linear(width, num_classes))

            def forward(self, x):
                return self.body(x)

        def no_classes(width=3):
            return torch.nn.Linear(4, width)

        class Gated(Net):
            """A forward that branches on a tensor's value, which vmap cannot batch."""

            def forward(self, x):
                out = self.body(x)
                return out if out.sum() > -1e9 else -out
        '''))
    fake_timm = folder / "fake_timm"
    (fake_timm / "timm").mkdir(parents=True)
    (fake_timm / "timm" / "__init__.py").write_text(textwrap.dedent('''
        import torch

        calls = []

        def create_model(name, pretrained=False, num_classes=1000, in_chans=3, **kwargs):
            calls.append(dict(name=name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                              **kwargs))
            return torch.nn.Sequential(torch.nn.Conv2d(in_chans, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                       torch.nn.Flatten(), torch.nn.Linear(4, num_classes))
        '''))
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("my_nets", None)


def test_a_model_by_import_path_gets_the_data_sizes_and_its_own_arguments(nets_module, tmp_path):
    import my_nets

    cfg = compose_run(["data=wine", "model=custom", "model._target_=my_nets.Net", "model.width=8",
                       "trainer.max_epochs=2"])
    (record,) = train(cfg, tmp_path)
    assert record["status"] == "completed"
    assert my_nets.built[-1] == {"in_features": 13, "num_classes": 3, "width": 8}


def final_weights(folder) -> dict[str, torch.Tensor]:
    state = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    return {name: value for name, value in state.items() if name.startswith("model.")}


def test_seeds_of_a_model_by_import_path_are_its_single_runs(nets_module, tmp_path, caplog):
    """seeds=3 of a custom model: stacked under vmap where it allows (Net), else trained one seed after
    another with a one-line note (Gated: Net's arithmetic, with a branch vmap refuses); either way seed s
    is exactly `seed=s` trained alone."""
    quick = ["data=wine", "model=custom", "model.width=8", "trainer.max_epochs=2"]
    alone = [train(compose_run([*quick, "model._target_=my_nets.Net", f"seed={seed}"]),
                   tmp_path / str(seed))[0] for seed in (3, 4, 5)]
    for target in ("my_nets.Net", "my_nets.Gated"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="xentlab.lab.run"):
            batch = train(compose_run([*quick, f"model._target_={target}", "seed=3", "seeds=3"]),
                          tmp_path / target)
        notes = [r.getMessage() for r in caplog.records if "cannot train stacked" in r.getMessage()]
        if target == "my_nets.Gated":
            (note,) = notes
            assert note.startswith(f"seeds=3: model {target} cannot train stacked (") and "\n" not in note
            assert note.endswith("its seeds train one after another")
        else:
            assert notes == []
        for seed, mine, theirs in zip((3, 4, 5), batch, alone, strict=True):
            assert mine["status"] == "completed" and mine["config"]["seed"] == seed
            for name, value in theirs["metrics"].items():
                assert mine["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), (target, name)
            weights = final_weights(tmp_path / target / f"seed={seed}")
            for name, value in final_weights(tmp_path / str(seed)).items():
                torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=f"{target} {name}")


@pytest.mark.parametrize(("target", "fragment"), [
    ("my_nets.Missing", "cannot import it"),
    ("my_nets.no_classes", "must take num_classes"),
])
def test_a_model_by_import_path_is_checked(nets_module, target, fragment):
    with pytest.raises(ValueError, match=fragment):
        build_model(_target_=target, in_features=4, num_outputs=3)


@pytest.mark.parametrize("group", ["model", "data"])
def test_a_target_on_a_built_in_group_points_to_the_custom_one(nets_module, group):
    """`<group>._target_=` (not a setting of a built-in) and `+<group>._target_=` (the built-in's settings
    would go to the user's class or factory) both name `<group>=custom`."""
    from hydra.errors import HydraException

    from xentlab.lab.validation import check_data, describe_composition_error

    with pytest.raises(HydraException) as raised:
        compose_run([f"{group}._target_=my_nets.Net"])
    assert f"choose {group}=custom {group}._target_=" in describe_composition_error(raised.value)
    cfg = compose_run([f"+{group}._target_=my_nets.Net"])
    refusal = f"cannot extend {group}=.*; choose {group}=custom {group}._target_="
    with pytest.raises(ValueError, match=refusal):
        if group == "model":
            build_model(**cfg.model, in_features=4, num_outputs=3)
        else:
            check_data(cfg.data)


def test_timm_models_are_wired_and_a_missing_timm_is_named(nets_module, fake_cifar, monkeypatch, tmp_path):
    import sys

    # timm itself needs torchvision, which cannot sit beside this torch build: a stand-in on sys.path
    # records how it is called.
    monkeypatch.syspath_prepend(str(nets_module / "fake_timm"))
    monkeypatch.delitem(sys.modules, "timm", raising=False)
    cfg = compose_run(["data=cifar10_lt", f"data.root={fake_cifar}", "data.imbalance_ratio=10",
                       "model=timm", "model.name=tiny_net", "model.drop_rate=0.1", "trainer.max_epochs=1"])
    assert train(cfg, tmp_path)[0]["status"] == "completed"
    import timm

    assert timm.calls[-1] == {"name": "tiny_net", "pretrained": False, "num_classes": 10, "in_chans": 3,
                              "drop_rate": 0.1}
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    with pytest.raises(ImportError, match=r"model=timm needs the optional extra: .*'xentlab\[timm\]'"):
        build_model(**cfg.model, input_shape=(3, 32, 32), num_outputs=10)
