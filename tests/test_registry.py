"""The loss registry: names, tasks, YAML defaults, the class-count hook, `_target_`, entry-point discovery."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from torch import nn

from xentlab import cli
from xentlab.losses import build_loss, builtin, get_loss, list_losses, register_loss, registry
from xentlab.train import CONFIG_DIR

BUILTIN_TASKS = {
    "ce": {"multiclass", "binary"},
    "weighted_ce": {"multiclass", "binary"},
    "label_smoothing": {"multiclass", "binary"},
    "focal": {"multiclass", "binary"},
    "mse": {"multiclass", "binary"},
    "bce": {"multilabel", "binary", "multiclass"},
    "logit_adjusted": {"multiclass", "binary"},
    "ldam": {"multiclass", "binary"},
    "poly1": {"multiclass", "binary"},
    "gce": {"multiclass", "binary"},
    "sigmoid_focal": {"multilabel", "binary", "multiclass"},
    "asl": {"multilabel", "binary", "multiclass"},
}
COUNTS = torch.tensor([50, 20, 10, 5])


@pytest.fixture
def isolated_registry():
    """Registrations and discoveries made by a test are undone after it."""
    state = registry._STATE
    saved = dict(state.losses), list(state.broken), state.discovered
    yield state
    state.losses.clear()
    state.losses.update(saved[0])
    state.broken[:] = saved[1]
    state.discovered = saved[2]


class CountingLoss(nn.Module):
    """Records what the class-count hook handed it."""

    def __init__(self, *, scale: float = 1.0, class_counts=None, reduction: str = "mean"):
        super().__init__()
        self.scale, self.class_counts, self.reduction = scale, class_counts, reduction

    def forward(self, input, target):
        return self.scale * nn.functional.cross_entropy(input, target, reduction=self.reduction)


class MultilabelOnly(nn.Module):
    xentlab_tasks = ("multilabel",)

    def forward(self, input, target):
        return nn.functional.binary_cross_entropy_with_logits(input, target)


# ---------------------------------------------------------------- names and tasks


def test_the_six_builtins_are_registered_with_their_tasks():
    entries = {e.name: e for e in list_losses()}
    assert {name: set(entries[name].tasks) for name in BUILTIN_TASKS} == BUILTIN_TASKS
    assert all(entries[name].source == "built-in" for name in BUILTIN_TASKS)
    assert [e.name for e in list_losses()] == sorted(entries)


def test_registering_the_same_class_again_is_a_no_op(isolated_registry):
    before = get_loss("focal")
    assert register_loss("focal", tasks=("multiclass", "binary"))(builtin.FocalLoss) is builtin.FocalLoss
    assert get_loss("focal") == before


def test_a_different_class_under_a_taken_name_is_an_error_naming_both(isolated_registry):
    taken = r"'focal' is taken by xentlab\.losses\.builtin\.FocalLoss.*cannot register .*CountingLoss"
    with pytest.raises(ValueError, match=taken):
        register_loss("focal")(CountingLoss)


def test_a_redefinition_of_the_same_class_replaces_it(isolated_registry):
    first = type("Redefined", (CountingLoss,), {"__module__": __name__})
    second = type("Redefined", (CountingLoss,), {"__module__": __name__})
    register_loss("test_redefined")(first)
    register_loss("test_redefined")(second)
    assert get_loss("test_redefined").cls is second


@pytest.mark.parametrize(("kwargs", "error", "fragment"), [
    ({"tasks": ("multiclass", "regression")}, ValueError, "regression"),
    ({"tasks": ()}, ValueError, "non-empty subset"),
])
def test_bad_task_declarations_are_refused(isolated_registry, kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        register_loss("test_bad", **kwargs)


def test_only_modules_can_be_registered(isolated_registry):
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_loss("test_function")(lambda x, y: x)


def test_an_unknown_name_lists_the_registered_names_and_the_closest_match():
    with pytest.raises(ValueError) as info:
        get_loss("focla")
    message = str(info.value)
    assert "Did you mean 'focal'?" in message
    for name in BUILTIN_TASKS:
        assert name in message


def test_a_task_mismatch_names_the_losses_that_fit():
    with pytest.raises(ValueError, match=r"'mse' does not support multilabel data.*multilabel data: .*bce"):
        build_loss("mse", task="multilabel")
    with pytest.raises(ValueError, match="unknown task 'regression'"):
        build_loss("ce", task="regression")


def test_an_unknown_parameter_names_the_closest_one():
    with pytest.raises(TypeError, match=r"no parameter 'gama' \(did you mean 'gamma'\?\).*alpha"):
        build_loss("focal", task="multiclass", gama=1.0)


# ---------------------------------------------------------------- defaults live in conf/loss


@pytest.mark.parametrize("name", sorted(BUILTIN_TASKS))
def test_yaml_keys_are_the_constructor_arguments_and_build(name):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"loss={name}"])
    accepted, _ = registry.constructor_parameters(get_loss(name).cls)
    assert set(cfg.loss) - {"name"} <= set(accepted)
    assert get_loss(name).config == builtin.CONF_DIR / f"{name}.yaml"
    task = sorted(BUILTIN_TASKS[name])[0]
    loss = build_loss(**cfg.loss, task=task, class_counts=COUNTS, num_examples=100)
    assert isinstance(loss, get_loss(name).cls)


def test_build_loss_fills_parameters_from_the_yaml():
    assert build_loss("focal").gamma == 2.0
    assert build_loss("label_smoothing").smoothing == 0.1
    assert build_loss("mse").on == "probs"
    assert build_loss("focal", gamma=0.5).gamma == 0.5
    assert get_loss("weighted_ce").parameters()["weights"] == "inverse_frequency"


def test_hydra_lists_the_valid_choices_for_an_unknown_loss_config():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        with pytest.raises(MissingConfigException) as info:
            compose(config_name="config", overrides=["loss=nosuch"])
    for name in [*BUILTIN_TASKS, "custom"]:
        assert f"\t{name}\n" in str(info.value)


# ---------------------------------------------------------------- the class-count hook


def test_counts_reach_only_the_losses_that_declare_them(isolated_registry):
    register_loss("test_counting")(CountingLoss)
    assert build_loss("test_counting", class_counts=COUNTS).class_counts is COUNTS
    assert build_loss("test_counting").class_counts is None
    build_loss("ce", class_counts=COUNTS, num_examples=85)  # would be a TypeError if ce were handed them
    assert get_loss("test_counting").hooks == ("class_counts",)
    assert get_loss("bce").hooks == ("class_counts", "num_examples")
    assert get_loss("ce").hooks == ()


# ---------------------------------------------------------------- _target_


def test_target_builds_any_importable_loss_without_registration():
    loss = build_loss(_target_="torch.nn.CrossEntropyLoss", task="multilabel", label_smoothing=0.1)
    assert type(loss) is nn.CrossEntropyLoss and loss.label_smoothing == 0.1


def test_target_classes_may_declare_their_tasks():
    path = f"{__name__}.MultilabelOnly"
    assert isinstance(build_loss(path, _target_=path, task="multilabel"), MultilabelOnly)
    with pytest.raises(ValueError, match="does not support multiclass data"):
        build_loss(path, _target_=path, task="multiclass")


def test_target_gets_the_class_count_hook_too():
    loss = build_loss(_target_=f"{__name__}.CountingLoss", class_counts=COUNTS, scale=2.0)
    assert loss.class_counts is COUNTS and loss.scale == 2.0


def test_a_registered_class_reached_by_target_keeps_its_tasks_and_defaults():
    path = "xentlab.losses.builtin.FocalLoss"
    assert build_loss(path, _target_=path, task="multiclass").gamma == 2.0
    with pytest.raises(ValueError, match="multilabel"):
        build_loss(path, _target_=path, task="multilabel")


@pytest.mark.parametrize(("path", "fragment"), [
    ("torch.nn.NoSuchLoss", "AttributeError"),
    ("nosuchpackage.Loss", "ModuleNotFoundError"),
    ("torch.nn.functional.cross_entropy", "nn.Module subclass"),
])
def test_an_unimportable_target_names_the_path(path, fragment):
    with pytest.raises(ValueError, match=fragment) as info:
        build_loss(_target_=path)
    assert path in str(info.value)


def test_a_config_naming_one_loss_and_targeting_another_is_refused():
    with pytest.raises(ValueError, match="loss=custom loss._target_=torch.nn.CrossEntropyLoss"):
        build_loss("ce", _target_="torch.nn.CrossEntropyLoss")


def test_loss_custom_config_labels_the_run_with_the_class_path():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "loss=custom", "loss._target_=torch.nn.CrossEntropyLoss", "loss.label_smoothing=0.2"])
    assert cfg.loss.name == "torch.nn.CrossEntropyLoss"
    loss = build_loss(**cfg.loss, task="multiclass", class_counts=COUNTS, num_examples=85)
    assert type(loss) is nn.CrossEntropyLoss and loss.label_smoothing == 0.2


# ---------------------------------------------------------------- entry points


GOOD_PLUGIN = '''
    from torch import nn
    from xentlab.losses import register_loss

    @register_loss("xl_fake_good", tasks=("multilabel",))
    class FakeGood(nn.Module):
        reduction = "mean"

        def forward(self, input, target):
            return nn.functional.binary_cross_entropy_with_logits(input, target)
'''


CONVENTIONAL_PLUGIN = '''
    from torch import nn

    class Plain(nn.Module):  # no decorator: the entry point `plain = xl_fake_conv:Plain` registers it
        def __init__(self, *, scale: float, reduction: str = "mean"):
            super().__init__()
            self.scale, self.reduction = scale, reduction

        def forward(self, input, target):
            return self.scale * nn.functional.cross_entropy(input, target, reduction=self.reduction)

    class Scaled(Plain):
        xentlab_tasks = ("multiclass", "binary")
'''


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch, isolated_registry):
    """A distribution `xl-fake-plugins` on sys.path with one good module, a package whose entry points name
    classes (`name = pkg:Class`, one with its defaults in the package's conf/loss/), and three broken ones."""
    package = tmp_path / "xl_fake_conv"
    (package / "conf" / "loss").mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(CONVENTIONAL_PLUGIN))
    (package / "conf" / "loss" / "scaled.yaml").write_text("scale: 3.0\n")
    modules = {
        "xl_fake_good": GOOD_PLUGIN,
        "xl_fake_broken": "raise ImportError('needs [libfoo], which is not installed')\n",
        "xl_fake_empty": "VALUE = 1\n",
    }
    for module, source in modules.items():
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    dist = tmp_path / "xl_fake_plugins-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: xl-fake-plugins\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[xentlab.losses]\ngood = xl_fake_good\nbroken = xl_fake_broken\nempty = xl_fake_empty\n"
        "missing = xl_fake_good:NoSuchLoss\nscaled = xl_fake_conv:Scaled\nplain = xl_fake_conv:Plain\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for module in [*modules, "xl_fake_conv"]:
        sys.modules.pop(module, None)


def test_plugins_are_discovered_and_broken_ones_reported_and_skipped(fake_plugins):
    with pytest.warns(RuntimeWarning, match="xl-fake-plugins"):
        registry.discover(refresh=True)
    entry = get_loss("xl_fake_good")
    assert (entry.source, entry.tasks) == ("xl-fake-plugins", ("multilabel",))
    broken = {b.entry_point.split(" = ")[0]: b for b in registry.broken_plugins()}
    assert {"broken", "empty", "missing"} <= set(broken)
    assert all(broken[name].distribution == "xl-fake-plugins" for name in ("broken", "empty", "missing"))
    assert broken["broken"].error == "ImportError: needs [libfoo], which is not installed"
    assert "registered no loss" in broken["empty"].error
    assert "NoSuchLoss" in broken["missing"].error
    assert "ce" in [e.name for e in list_losses()]  # the built-ins are untouched


def test_an_entry_point_naming_a_class_registers_it_under_the_entry_points_name(fake_plugins):
    with pytest.warns(RuntimeWarning):
        registry.discover(refresh=True)
    scaled, plain = get_loss("scaled"), get_loss("plain")
    assert (scaled.source, scaled.tasks, plain.tasks) == ("xl-fake-plugins", ("multiclass", "binary"),
                                                          ("multiclass",))
    assert scaled.parameters() == {"scale": 3.0, "reduction": "mean"}  # from xl_fake_conv/conf/loss/
    assert build_loss("scaled", task="binary").scale == 3.0
    with pytest.raises(ValueError, match="does not support multilabel"):
        build_loss("plain", task="multilabel", scale=1.0)


def test_xentlab_losses_shows_plugins_and_failures(fake_plugins, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.warns(RuntimeWarning):
        registry.discover(refresh=True)
    assert cli.main(["losses"]) == 0
    out = capsys.readouterr().out
    for fragment in ["xl_fake_good", "xl-fake-plugins", "failed to load", "needs [libfoo]", "gamma=2.0",
                     "multilabel, binary, multiclass", "built-in", *BUILTIN_TASKS]:
        assert fragment in out, fragment


def test_discovery_is_lazy():
    code = ("import xentlab.losses, xentlab.losses.registry as r; before = r._STATE.discovered; "
            "r.list_losses(); print(before, r._STATE.discovered)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "True"], out.stderr
