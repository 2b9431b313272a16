"""The built-in losses: the conformance kit on each, their semantics over xentlab.functional, their state,
their errors, and the kit itself catching broken losses."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn
from torch.nn import functional as TF

from xentlab import weights
from xentlab.lab.run import build_run, train
from xentlab.losses import build_loss, list_losses
from xentlab.testing import CHECKS, LATE_EPOCH, LossCheckError, check_loss
from xentlab.train import CONFIG_DIR

BUILTIN_CASES = [(e.name, task) for e in list_losses() if e.source == "built-in" for task in e.tasks]
COUNTS = torch.tensor([40, 20, 10, 5])


@pytest.mark.parametrize(("name", "task"), BUILTIN_CASES, ids=[f"{n}-{t}" for n, t in BUILTIN_CASES])
def test_every_builtin_passes_the_conformance_kit_on_every_task_it_declares(name, task):
    report = check_loss(name, task=task)
    has_hook = hasattr(build_loss(name, class_counts=COUNTS, num_examples=100), "on_train_epoch_start")
    assert report.ok and len(report.results) == len(CHECKS) * (2 if has_hook else 1)


@pytest.mark.parametrize(("name", "task", "params"), [
    ("weighted_ce", "multiclass", {"weights": "sqrt_inverse"}),
    ("weighted_ce", "multiclass", {"weights": "effective_number", "beta": 0.99}),
    ("weighted_ce", "multiclass", {"weights": [1.0, 2.0, 3.0, 4.0]}),
    ("label_smoothing", "multiclass", {"smoothing": 0.4}),
    ("focal", "multiclass", {"gamma": 0.5, "alpha": "inverse_frequency"}),
    ("focal", "binary", {"gamma": 0.0, "alpha": [0.25, 0.75]}),
    ("bce", "multilabel", {"pos_weight": "balanced"}),
    ("bce", "multiclass", {"pos_weight": [1.0, 2.0, 3.0, 4.0]}),
    ("mse", "multiclass", {"on": "logits"}),
    ("logit_adjusted", "multiclass", {"tau": 2.0}),
    ("ldam", "multiclass", {"drw_epoch": 1, "scale": 1.0, "max_margin": 1.0}),
    ("poly1", "multiclass", {"epsilon": -1.0}),
    ("gce", "binary", {"q": 1.0}),
    ("asl", "multilabel", {"gamma_pos": 1.0, "gamma_neg": 2.0, "clip": 0.0}),
    ("sigmoid_focal", "multiclass", {"alpha": -1.0, "gamma": 0.5}),
])
def test_the_kit_passes_with_non_default_parameters(name, task, params):
    assert check_loss(name, task=task, **params).ok


def test_the_report_is_readable():
    text = str(check_loss("ce", task="multiclass"))
    assert text.startswith("check_loss('ce', task=multiclass, C=4): 6/6 checks passed")
    for check_name, _ in CHECKS:
        assert f"PASS  {check_name}" in text
    assert "sum = mean * 12 (N)" in text


# ---------------------------------------------------------------- the kit catches broken losses


class _Reducing(nn.Module):
    reduction = "mean"

    def reduce(self, per_row, denominator=None):
        if self.reduction == "none":
            return per_row
        if self.reduction == "sum":
            return per_row.sum()
        return per_row.sum() / (len(per_row) if denominator is None else denominator)


class LogOfSoftmax(_Reducing):
    """log(softmax) underflows to log(0) = -inf once the true logit trails by ~100."""

    def forward(self, x, t):
        return self.reduce(-x.softmax(1).gather(1, t[:, None]).squeeze(1).log())


class DoubledGradient(_Reducing):
    """The right value with twice the gradient (a wrong hand-written backward, in effect)."""

    def forward(self, x, t):
        ce = TF.cross_entropy(x, t, reduction="none")
        return self.reduce(2 * ce - ce.detach())


class LogitScaledMean(_Reducing):
    """`mean` divides by a quantity of the logits, not of the targets."""

    def forward(self, x, t):
        return self.reduce(TF.cross_entropy(x, t, reduction="none"), len(x) + x.square().sum())


class PositionWeighted(_Reducing):
    """Weights rows by their position in the batch."""

    def forward(self, x, t):
        position = torch.arange(1, len(x) + 1, dtype=x.dtype)
        return self.reduce(position * TF.cross_entropy(x, t, reduction="none"), position.sum())


class Negated(_Reducing):
    """Minimising it maximises cross-entropy: the loss falls while the model unlearns the classes."""

    def forward(self, x, t):
        return self.reduce(-TF.cross_entropy(x, t, reduction="none"))


class NoReductionAttribute(nn.Module):
    def forward(self, x, t):
        return TF.cross_entropy(x, t)


@pytest.mark.parametrize(("loss", "failing", "fragment"), [
    (LogOfSoftmax(), "finite on extreme logits", "non-finite"),
    (DoubledGradient(), "gradcheck (float64)", "gradients differ"),
    (LogitScaledMean(), "reduction consistency", "does not depend on the logits"),
    (PositionWeighted(), "batch-order invariance", "permuted"),
    (Negated(), "learns a separable problem", "fits 0%"),
    (NoReductionAttribute(), "reduction consistency", "no `reduction` attribute"),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None)
def test_the_kit_catches_a_broken_loss_and_says_which_check_failed(loss, failing, fragment):
    with pytest.raises(LossCheckError) as info:
        check_loss(loss, task="multiclass")
    report = info.value.report
    assert report.failed == [failing], str(report)
    assert fragment in next(r.detail for r in report.results if r.name == failing)
    assert f"FAIL  {failing}" in str(info.value)


class Crashing(_Reducing):
    def forward(self, x, t):
        raise RuntimeError("shape mismatch in my loss")


class ForgetsItsWeightsLate(_Reducing):
    """Fine until the epoch hook switches on weights of the wrong length (a broken DRW)."""

    def __init__(self):
        super().__init__()
        self.weight = None

    def on_train_epoch_start(self, epoch: int) -> None:
        self.weight = None if epoch < 5 else torch.ones(3)

    def forward(self, x, t):
        return TF.cross_entropy(x, t, weight=self.weight, reduction=self.reduction)


def test_the_kit_runs_every_check_after_the_epoch_hook_for_an_early_and_a_late_epoch():
    with pytest.raises(LossCheckError) as info:
        check_loss(ForgetsItsWeightsLate(), task="multiclass", num_classes=4)
    report = info.value.report
    assert len(report.results) == 2 * len(CHECKS)
    assert not any(r.name.endswith("@ epoch 0") for r in report.results if not r.passed)
    assert report.failed == [f"{name} @ epoch {LATE_EPOCH}" for name, _ in CHECKS]


def test_a_loss_that_raises_fails_every_check_with_the_error_instead_of_stopping_the_kit():
    with pytest.raises(LossCheckError) as info:
        check_loss(Crashing(), task="multiclass")
    assert info.value.report.failed == [name for name, _ in CHECKS]
    assert str(info.value).count("raised RuntimeError: shape mismatch in my loss") == len(CHECKS)


def test_check_loss_input_errors():
    with pytest.raises(ValueError, match="unknown task"):
        check_loss("ce", task="regression")
    with pytest.raises(TypeError, match="parameters"):
        check_loss(build_loss("ce"), task="multiclass", gamma=1.0)
    with pytest.raises(ValueError, match="binary data has C = 2"):
        check_loss("ce", task="binary", num_classes=3)


# ---------------------------------------------------------------- semantics over xentlab.functional


def test_ce_reproduces_the_reference_number():
    x = torch.tensor([[2.0, 1.0, 0.1], [0.0, 5.0, 0.2]], requires_grad=True)
    loss = build_loss("ce")(x, torch.tensor([0, 1]))
    assert round(loss.item(), 4) == 0.2159
    loss.backward()
    torch.testing.assert_close(x.grad, (x.softmax(1) - torch.eye(3)[[0, 1]]).detach() / 2)


def test_weighted_ce_reproduces_the_reference_number_with_explicit_weights():
    loss = build_loss("weighted_ce", weights=[1.0, 10.0])(torch.tensor([[2.0, 1.0], [2.0, 1.0]]),
                                                          torch.tensor([1, 1]))
    assert round(loss.item(), 4) == 1.3133


@pytest.mark.parametrize("method", weights.METHODS)
def test_weighted_ce_derives_its_weights_from_the_class_counts(method):
    loss = build_loss("weighted_ce", weights=method, beta=0.99, class_counts=COUNTS)
    expected = weights.class_weights(COUNTS, method, beta=0.99)
    torch.testing.assert_close(loss.weight, expected)
    x, t = torch.randn(9, 4), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3])
    torch.testing.assert_close(loss(x, t), TF.cross_entropy(x, t, weight=expected))


def test_label_smoothing_matches_pytorch():
    x, t = torch.randn(8, 5), torch.randint(0, 5, (8,))
    torch.testing.assert_close(build_loss("label_smoothing", smoothing=0.3)(x, t),
                               TF.cross_entropy(x, t, label_smoothing=0.3))


def test_focal_with_gamma_zero_is_weighted_ce_in_value_and_gradient():
    x, t = torch.randn(10, 4, requires_grad=True), torch.randint(0, 4, (10,))
    focal = build_loss("focal", gamma=0.0, alpha="inverse_frequency", class_counts=COUNTS)
    weighted = build_loss("weighted_ce", weights="inverse_frequency", class_counts=COUNTS)
    torch.testing.assert_close(focal.alpha, weighted.weight)
    (grad_focal,) = torch.autograd.grad(focal(x, t), x)
    (grad_weighted,) = torch.autograd.grad(weighted(x, t), x)
    torch.testing.assert_close(focal(x, t), weighted(x, t))
    torch.testing.assert_close(grad_focal, grad_weighted)


def test_bce_trains_one_vs_rest_on_class_indices():
    x, t = torch.randn(6, 4), torch.tensor([0, 3, 1, 2, 3, 0])
    pos_weight = torch.tensor([1.0, 2.0, 3.0, 4.0])
    loss = build_loss("bce", pos_weight=pos_weight.tolist())
    torch.testing.assert_close(loss(x, t), TF.binary_cross_entropy_with_logits(
        x, TF.one_hot(t, 4).float(), pos_weight=pos_weight))


def test_bce_takes_multi_hot_targets_and_a_single_logit_column():
    x, multi_hot = torch.randn(6, 3), (torch.rand(6, 3) > 0.5).float()
    loss = build_loss("bce")
    torch.testing.assert_close(loss(x, multi_hot), TF.binary_cross_entropy_with_logits(x, multi_hot))
    column, labels = torch.randn(6, 1), torch.tensor([0, 1, 1, 0, 1, 0])
    torch.testing.assert_close(loss(column, labels),
                               TF.binary_cross_entropy_with_logits(column, labels[:, None].float()))


def test_bce_balanced_pos_weight_is_negatives_over_positives():
    positives = torch.tensor([10, 25, 50])
    loss = build_loss("bce", pos_weight="balanced", class_counts=positives, num_examples=100)
    torch.testing.assert_close(loss.pos_weight, torch.tensor([9.0, 3.0, 1.0]))
    torch.testing.assert_close(loss.pos_weight, weights.pos_weight_from_counts(positives, 100))


@pytest.mark.parametrize("on", ["probs", "logits"])
def test_mse_compares_probabilities_or_logits_with_the_one_hot_target(on):
    x, t = torch.randn(7, 3), torch.randint(0, 3, (7,))
    prediction = x.softmax(1) if on == "probs" else x
    expected = TF.mse_loss(prediction, TF.one_hot(t, 3).float())
    torch.testing.assert_close(build_loss("mse", on=on)(x, t), expected)


def test_logit_adjusted_shifts_the_logits_by_tau_log_priors_of_the_counts():
    x, t = torch.randn(9, 4, dtype=torch.float64, requires_grad=True), torch.randint(0, 4, (9,))
    loss = build_loss("logit_adjusted", class_counts=COUNTS, tau=0.5).double()
    prior = COUNTS.double() / COUNTS.sum()
    (ours,) = torch.autograd.grad(value := loss(x, t), x)
    (truth,) = torch.autograd.grad(expected := TF.cross_entropy(x + 0.5 * prior.log(), t), x)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(ours, truth)


def test_the_balanced_softmax_config_is_logit_adjustment_with_tau_one():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["loss=balanced_softmax"])
    loss = build_loss(**cfg.loss, class_counts=COUNTS)
    assert type(loss).__name__ == "LogitAdjustedCrossEntropy" and loss.tau == 1.0


def test_ldam_margins_and_deferred_reweighting_follow_the_paper():
    loss = build_loss("ldam", class_counts=COUNTS, drw_epoch=3, scale=10.0).double()
    expected = COUNTS.double() ** -0.25
    torch.testing.assert_close(loss.margins, 0.5 * expected / expected.max())
    x, t = torch.randn(12, 4, dtype=torch.float64), torch.arange(12) % 4
    shifted = 10.0 * (x - TF.one_hot(t, 4) * loss.margins[t][:, None])
    drw = weights.class_weights(COUNTS, "effective_number", beta=0.9999).double()
    for epoch, weight in ((0, None), (2, None), (3, drw), (7, drw)):
        loss.on_train_epoch_start(epoch)
        torch.testing.assert_close(loss(x, t), TF.cross_entropy(shifted, t, weight=weight))
    loss.on_train_epoch_start(1)  # a resumed run that goes back before drw_epoch drops the weights again
    torch.testing.assert_close(loss(x, t), TF.cross_entropy(shifted, t))
    assert build_loss("ldam", class_counts=COUNTS).drw_weight is None


def test_poly1_and_gce_are_their_functions_of_the_true_class_probability():
    x, t = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 4, (10,))
    p_y = x.softmax(1).gather(1, t[:, None]).squeeze(1)
    torch.testing.assert_close(build_loss("poly1")(x, t), (-p_y.log() + (1 - p_y)).mean())
    torch.testing.assert_close(build_loss("gce")(x, t), ((1 - p_y**0.7) / 0.7).mean())


@pytest.mark.parametrize("name", ["sigmoid_focal", "asl"])
def test_sigmoid_losses_train_one_vs_rest_on_class_indices(name):
    x, t = torch.randn(6, 3), torch.tensor([0, 2, 1, 1, 0, 2])
    loss = build_loss(name)
    torch.testing.assert_close(loss(x, t), loss(x, TF.one_hot(t, 3).float()))


def test_every_builtin_declares_how_its_logits_map_to_probabilities():
    sigmoid = {"bce", "sigmoid_focal", "asl"}
    for entry in list_losses():
        if entry.source != "built-in":
            continue
        loss = build_loss(entry.name, class_counts=COUNTS, num_examples=100)
        assert loss.probability_map == ("sigmoid" if entry.name in sigmoid else "softmax"), entry.name
    assert build_loss("mse", on="logits").probability_map == "sigmoid"


# ---------------------------------------------------------------- state: buffers travel and checkpoint


@pytest.mark.parametrize(("name", "params", "buffer"), [
    ("weighted_ce", {"weights": "sqrt_inverse"}, "weight"),
    ("focal", {"alpha": "effective_number"}, "alpha"),
    ("bce", {"pos_weight": "balanced"}, "pos_weight"),
])
def test_derived_vectors_are_buffers_that_move_and_checkpoint(name, params, buffer):
    loss = build_loss(name, class_counts=COUNTS, num_examples=100, **params)
    state = loss.state_dict()
    assert set(state) == {buffer}
    restored = build_loss(name, **{key: [1.0] * 4 for key in params})
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.get_buffer(buffer), loss.get_buffer(buffer))
    assert not torch.equal(loss.get_buffer(buffer), torch.ones(4))
    assert loss.double().get_buffer(buffer).dtype == torch.float64


def test_count_derived_vectors_of_the_long_tail_losses_checkpoint():
    adjusted = build_loss("logit_adjusted", class_counts=COUNTS)
    assert set(adjusted.state_dict()) == {"log_prior"}
    ldam = build_loss("ldam", class_counts=COUNTS, drw_epoch=2)
    restored = build_loss("ldam", class_counts=torch.ones(4), drw_epoch=2)
    restored.load_state_dict(ldam.state_dict())
    torch.testing.assert_close(restored.margins, ldam.margins)
    torch.testing.assert_close(restored.drw_weight, ldam.drw_weight)


def test_losses_without_vectors_keep_no_state():
    assert build_loss("focal").state_dict() == {}
    assert build_loss("ce").state_dict() == {}


# ---------------------------------------------------------------- errors at construction


@pytest.mark.parametrize(("name", "params", "error", "fragment"), [
    ("weighted_ce", {"weights": None}, ValueError, "weighted_ce needs weights"),
    ("weighted_ce", {"weights": "inverse_freq"}, ValueError, "inverse_frequency | sqrt_inverse"),
    ("weighted_ce", {"weights": "inverse_frequency"}, ValueError, "class counts, which were not given"),
    ("weighted_ce", {"weights": [[1.0, 2.0]]}, ValueError, "1-D"),
    ("focal", {"gamma": -1.0}, ValueError, "gamma"),
    ("focal", {"alpha": "balanced"}, ValueError, "alpha must be"),
    ("bce", {"pos_weight": "balanced", "class_counts": COUNTS}, ValueError, "num_examples"),
    ("bce", {"pos_weight": "inverse_frequency"}, ValueError, "balanced"),
    ("label_smoothing", {"smoothing": 1.5}, ValueError, "smoothing"),
    ("mse", {"on": "probabilities"}, ValueError, "on must be one of probs, logits"),
    ("ce", {"reduction": "average"}, ValueError, "reduction must be one of none, mean, sum"),
    ("ce", {"backend": "cuda"}, ValueError, "backend must be one of auto, fused, triton, reference"),
    ("logit_adjusted", {}, ValueError, "class counts, which were not given"),
    ("ldam", {}, ValueError, "class counts, which were not given"),
    ("ldam", {"class_counts": COUNTS, "drw_epoch": -1}, ValueError, "drw_epoch"),
    ("ldam", {"class_counts": COUNTS, "scale": 0.0}, ValueError, r"scale must be a finite number in \(0.0, "),
    ("ldam", {"class_counts": COUNTS, "max_margin": 0.0}, ValueError, "max_margin"),
    ("gce", {"q": 0.0}, ValueError, r"q must be a finite number in \(0.0, 1.0\].*cross-entropy"),
    ("poly1", {"epsilon": -2.0}, ValueError, "epsilon"),
    ("asl", {"clip": 1.5}, ValueError, "clip"),
])
def test_bad_parameters_fail_when_the_loss_is_built(name, params, error, fragment):
    with pytest.raises(error, match=fragment):
        build_loss(name, **params)


def test_bce_refuses_a_class_index_outside_the_logits():
    with pytest.raises(ValueError, match=r"class index 4, outside \[0, 4\)"):
        build_loss("bce")(torch.randn(2, 4), torch.tensor([0, 4]))


# ---------------------------------------------------------------- in a run


def compose_run(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[
            "data.n_samples=300", "model.hidden_sizes=[8]", "trainer.max_epochs=1", *overrides])


def test_a_loss_that_does_not_fit_the_data_fails_at_start_up(tmp_path):
    with pytest.raises(ValueError, match=r"'focal' does not support multilabel data.*multilabel data: .*bce"):
        build_run(compose_run("data=multilabel", "loss=focal"), tmp_path)
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_bce_with_balanced_pos_weight_trains_on_multilabel_data(tmp_path):
    cfg = compose_run("data=multilabel", "loss=bce", "loss.pos_weight=balanced")
    _, module, datamodule = build_run(cfg, tmp_path)
    n_train = len(datamodule.splits["train"][1])
    torch.testing.assert_close(module.losses[0].pos_weight,
                               weights.pos_weight_from_counts(datamodule.class_counts, n_train))
    assert train(cfg, tmp_path)[0]["status"] == "completed"
