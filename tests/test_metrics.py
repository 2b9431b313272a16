"""Metrics agree with scikit-learn on fixed predictions; probability maps and post-hoc adjustments against
hand computations; calibration bins, loss curves, figures, grad norm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from pytorch_lightning.loggers import TensorBoardLogger
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve
from torchmetrics import classification as tmc

from xentlab import functional as xF
from xentlab.lab import plots
from xentlab.lab.metrics import (
    N_BINS,
    StageMetrics,
    bin_index,
    counted_metrics,
    decision_stats,
    fit_temperature,
    logit_adjusted,
    loss_curve,
    model_prior,
    per_label,
    probabilities,
    shift_calibration,
    temperature_scaled,
)
from xentlab.lab.module import ClassifierModule, SeedRun


def single_run_module(model, loss, task="multiclass", num_classes=4):
    """A one-seed ClassifierModule without data or logger of its own."""
    return ClassifierModule(model, [loss], [SeedRun(0, None, None, {})], task=task, num_classes=num_classes,
                            optimizer=torch.optim.SGD)


def fixed_predictions(n: int, c: int, seed: int, multilabel: bool = False):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=generator) * 2
    if multilabel:
        target = (torch.rand(n, c, generator=generator) < torch.linspace(0.1, 0.6, c)).float()
        return logits + 2 * (target - 0.5), target
    target = torch.multinomial(torch.linspace(1.0, 0.1, c), n, replacement=True, generator=generator)
    return logits + 1.5 * torch.nn.functional.one_hot(target, c), target


def computed(task, logits, target, chunks=3, hold_elements=1 << 20, probability_map="softmax"):
    """A one-seed StageMetrics streamed (N, C) logits in `chunks` batches, and its values."""
    metrics = StageMetrics(task, logits.shape[1], keep_predictions=True, hold_elements=hold_elements,
                           probability_map=probability_map)
    for part_logits, part_target in zip(logits.chunk(chunks), target.chunk(chunks), strict=True):  # streaming
        metrics.update(part_logits[None], part_target[None], torch.zeros(1))
    return metrics, metrics.compute()[0]


def sklearn_ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE from sklearn's calibration_curve (uniform bins) weighted by the bin populations."""
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=n_bins, strategy="uniform")
    edges = np.linspace(0, 1, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=n_bins)
    counts = counts[counts > 0]
    return float(np.sum(counts / counts.sum() * np.abs(accuracy - mean_confidence)))


@pytest.mark.parametrize("num_classes", [2, 5])
def test_single_label_metrics_agree_with_sklearn(num_classes):
    logits, target = fixed_predictions(600, num_classes, seed=num_classes)
    _, values = computed("multiclass", logits, target)
    probs = torch.softmax(logits.double(), 1).numpy()
    y, predicted = target.numpy(), probs.argmax(1)
    assert values["accuracy"] == pytest.approx(skm.accuracy_score(y, predicted), abs=1e-6)
    assert values["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, predicted), abs=1e-6)
    assert values["balanced_accuracy"] != pytest.approx(values["accuracy"], abs=1e-3)  # imbalanced on purpose
    assert values["macro_f1"] == pytest.approx(skm.f1_score(y, predicted, average="macro"), abs=1e-6)
    recalls = skm.recall_score(y, predicted, average=None)
    for c in range(num_classes):
        assert values[f"recall_class_{c}"] == pytest.approx(recalls[c], abs=1e-6)
    assert values["nll"] == pytest.approx(skm.log_loss(y, probs, labels=range(num_classes)), rel=1e-5)
    assert values["brier"] == pytest.approx(
        skm.brier_score_loss(y, probs, labels=range(num_classes), scale_by_half=False), rel=1e-5)
    assert values["ece"] == pytest.approx(sklearn_ece(probs.max(1), (predicted == y).astype(float)), abs=1e-6)


def test_ece_matches_torchmetrics_top_label_15_bins():
    logits, target = fixed_predictions(500, 4, seed=7)
    _, values = computed("multiclass", logits, target)
    reference = torchmetrics.classification.MulticlassCalibrationError(4, n_bins=15, norm="l1")
    assert values["ece"] == pytest.approx(float(reference(torch.softmax(logits, 1), target)), abs=1e-6)


def test_multilabel_metrics_agree_with_sklearn():
    logits, target = fixed_predictions(500, 6, seed=11, multilabel=True)
    _, values = computed("multilabel", logits, target)
    probs = torch.sigmoid(logits.double()).numpy()
    y, predicted = target.numpy().astype(int), (probs >= 0.5).astype(int)
    assert values["micro_f1"] == pytest.approx(skm.f1_score(y, predicted, average="micro"), abs=1e-6)
    assert values["macro_f1"] == pytest.approx(skm.f1_score(y, predicted, average="macro"), abs=1e-6)
    assert values["map"] == pytest.approx(skm.average_precision_score(y, probs, average="macro"), abs=1e-5)
    assert values["hamming_loss"] == pytest.approx(skm.hamming_loss(y, predicted), abs=1e-6)
    assert values["exact_match"] == pytest.approx(skm.accuracy_score(y, predicted), abs=1e-6)
    balanced = np.mean([skm.balanced_accuracy_score(y[:, j], predicted[:, j]) for j in range(6)])
    assert values["balanced_accuracy"] == pytest.approx(balanced, abs=1e-6)
    recalls = skm.recall_score(y, predicted, average=None)
    for j in range(6):
        assert values[f"recall_class_{j}"] == pytest.approx(recalls[j], abs=1e-6)
    flat_y, flat_p = y.ravel(), probs.ravel()
    assert values["nll"] == pytest.approx(skm.log_loss(flat_y, flat_p), rel=1e-5)
    assert values["brier"] == pytest.approx(skm.brier_score_loss(flat_y, flat_p), rel=1e-5)
    correct = ((flat_p >= 0.5) == flat_y).astype(float)
    assert values["ece"] == pytest.approx(sklearn_ece(np.maximum(flat_p, 1 - flat_p), correct), abs=1e-6)


@pytest.mark.parametrize(("task", "c"), [("multiclass", 4), ("multilabel", 3)])
def test_confusion_matrix_agrees_with_sklearn(task, c):
    logits, target = fixed_predictions(300, c, seed=5, multilabel=task == "multilabel")
    metrics, _ = computed(task, logits, target)
    matrix = metrics.confusion_matrix()[0].numpy()
    if task == "multilabel":
        predicted = (torch.sigmoid(logits) >= 0.5).int().numpy()
        expected = skm.multilabel_confusion_matrix(target.int().numpy(), predicted)
    else:
        expected = skm.confusion_matrix(target.numpy(), logits.argmax(1).numpy(), labels=range(c))
    np.testing.assert_array_equal(matrix, expected)


@pytest.mark.parametrize(("task", "c"), [("multiclass", 4), ("multilabel", 3)])
def test_folding_batches_early_changes_no_value_and_bounds_what_is_held(task, c):
    logits, target = fixed_predictions(300, c, seed=6, multilabel=task == "multilabel")
    _, held = computed(task, logits, target, chunks=10)
    hold = 2 * 30 * c  # two of the ten batches
    metrics = StageMetrics(task, c, keep_predictions=True, hold_elements=hold)
    for part_logits, part_target in zip(logits.chunk(10), target.chunk(10), strict=True):
        metrics.update(part_logits[None], part_target[None], torch.zeros(1))
        assert metrics._held_elements < hold
    folded = metrics.compute()[0]
    assert folded.keys() == held.keys()
    for name in held:
        assert folded[name] == pytest.approx(held[name], rel=1e-6, abs=1e-9), name
    (probs,), (kept_target,) = metrics.kept_predictions()
    np.testing.assert_allclose(probs.numpy(), probabilities(logits, task).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(kept_target.numpy(), target.numpy())


def test_reset_forgets_the_previous_epoch():
    logits, target = fixed_predictions(200, 3, seed=2)
    metrics, first = computed("multiclass", logits, target)
    metrics.reset()
    metrics.update(logits[None, :50], target[None, :50], torch.zeros(1))
    assert metrics.compute()[0]["accuracy"] == pytest.approx(
        skm.accuracy_score(target[:50].numpy(), logits[:50].argmax(1).numpy()), abs=1e-6)
    assert metrics.kept_predictions()[1].shape == (1, 50)


def test_loss_is_the_sample_mean_over_uneven_batches_and_keeps_nan():
    logits, target = fixed_predictions(100, 3, seed=3)
    metrics = StageMetrics("multiclass", 3, full=False)
    for batch in (slice(0, 10), slice(10, 100)):
        metrics.update(logits[None, batch], target[None, batch],
                       F.cross_entropy(logits[batch], target[batch]).reshape(1))
    expected = F.cross_entropy(logits, target)
    assert metrics.compute()[0]["loss"] == pytest.approx(float(expected), rel=1e-6)
    metrics.update(logits[None, :5], target[None, :5], torch.tensor([float("nan")]))
    assert math.isnan(metrics.compute()[0]["loss"])


def test_calibration_bins_are_left_closed_and_the_last_includes_one():
    confidence = torch.tensor([0.0, 1 / 30, 1 / 15, 0.5, 14 / 15 - 1e-6, 14 / 15, 1.0])
    assert bin_index(confidence).tolist() == [0, 0, 1, 7, 13, 14, 14]


def test_loss_curves_reproduce_cross_entropy_and_mse_in_closed_form():
    p, c = torch.tensor([0.1, 0.5, 0.9]), 4
    ce, ce_grad = loss_curve(xF.cross_entropy, p, task="multiclass", num_classes=c, true_class=2)
    torch.testing.assert_close(ce, -p.log(), atol=1e-5, rtol=1e-5)
    rest = (1 - p) / (c - 1)
    torch.testing.assert_close(ce_grad, ((1 - p) ** 2 + (c - 1) * rest ** 2).sqrt(), atol=1e-5, rtol=1e-5)
    mse, _ = loss_curve(xF.mse_loss, p, task="multiclass", num_classes=c, true_class=2)
    torch.testing.assert_close(mse, ((1 - p) ** 2 + (c - 1) * rest ** 2) / c, atol=1e-5, rtol=1e-5)
    # The docs/losses.md anchor values: p_true -> -log p.
    assert loss_curve(xF.cross_entropy, torch.tensor([0.01]), task="multiclass", num_classes=3)[0].item() == \
        pytest.approx(4.605, abs=1e-3)


def test_per_label_turns_softmax_losses_into_their_sigmoid_forms():
    logits, target = fixed_predictions(40, 5, seed=3, multilabel=True)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(per_label(xF.cross_entropy)(logits, target), bce, atol=1e-5, rtol=1e-5)
    brier = ((torch.sigmoid(logits) - target) ** 2).mean()
    torch.testing.assert_close(per_label(xF.mse_loss)(logits, target), brier, atol=1e-6, rtol=1e-5)
    p = torch.tensor([0.2, 0.7])
    values, grads = loss_curve(torch.nn.functional.binary_cross_entropy_with_logits, p, task="multilabel",
                               num_classes=5)
    torch.testing.assert_close(values, -p.log(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads, 1 - p, atol=1e-5, rtol=1e-5)  # d(-log sigmoid x)/dx per label


def test_module_attributes_still_register_parameters_buffers_and_submodules():
    module = single_run_module(torch.nn.Linear(3, 4), torch.nn.CrossEntropyLoss())
    module.figure_every_n_epochs = 3  # a plain attribute given a plain value: the short path
    assert module.figure_every_n_epochs == 3 and "figure_every_n_epochs" in vars(module)
    module.task = torch.nn.Linear(3, 2)  # a plain attribute given a module becomes a submodule
    assert "task" in dict(module.named_children()) and "task" not in vars(module)
    module.model = torch.nn.Linear(3, 5)
    assert dict(module.named_parameters())["model.weight"].shape == (5, 3)
    module.register_buffer("scale", torch.ones(2))
    module.scale = torch.zeros(2)
    assert torch.equal(dict(module.named_buffers())["scale"], torch.zeros(2))
    module.eval()
    assert not module.training and not module.model.training


def test_logit_gradient_norm_is_the_mean_per_sample_push_and_leaves_the_loss_alone(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    loss = torch.nn.CrossEntropyLoss()
    module = single_run_module(model, loss)
    x, y = torch.randn(16, 3), torch.randint(0, 4, (16,))
    # The norm is recorded only on steps Lightning writes to the logger: with every 2nd step, not step 0.
    logger = TensorBoardLogger(tmp_path)
    module.trainer = pl.Trainer(log_every_n_steps=2, logger=logger, enable_progress_bar=False)
    module._step((x, y), "train").sum().backward()
    assert module._logit_grad_norms is None
    module.trainer = pl.Trainer(log_every_n_steps=1, logger=False, enable_progress_bar=False)
    module._step((x, y), "train").sum().backward()
    assert module._logit_grad_norms is None  # nothing to log it to
    module.trainer = pl.Trainer(log_every_n_steps=1, logger=logger, enable_progress_bar=False)
    model.zero_grad()
    (value,) = module._step((x, y), "train")
    value.backward()
    expected = (torch.softmax(model(x), 1) - torch.nn.functional.one_hot(y, 4)).norm(dim=1).mean()
    assert float(module._logit_grad_norms[0]) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(value.detach()) == pytest.approx(float(loss(model(x), y).detach()), rel=1e-6)
    grads_with_hook = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss(model(x), y).backward()
    for with_hook, plain in zip(grads_with_hook, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(with_hook, plain)


def test_figures_render_to_rgb_images():
    rng = np.random.default_rng(0)
    curves = {"ce": (np.arange(9.0), np.ones(9)), "mse": (np.ones(9), np.ones(9))}
    images = [
        plots.to_image(plots.confusion_matrix_figure(rng.integers(0, 50, (4, 4)))),
        plots.to_image(plots.multilabel_confusion_figure(rng.integers(0, 50, (3, 2, 2)))),
        plots.to_image(plots.reliability_figure(np.linspace(0.05, 0.95, 15), np.linspace(0, 1, 15) ** 2,
                                                rng.integers(0, 30, 15), 0.12)),
        plots.to_image(plots.loss_curves_figure(np.linspace(0.01, 0.99, 9), curves)),
    ]
    for image in images:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 10  # drawn, not blank


def test_a_redrawn_figure_has_the_pixels_of_a_fresh_one():
    # One kept figure per layout, its axes drawn once, redrawn with each new data set and title (empty
    # bins, counts on another scale and other sizes between).
    rng = np.random.default_rng(1)
    redrawn = plots.Redrawn()
    for stage, n, n_bins, scale in (("val", 5, 15, 30), ("test", 3, 15, 30), ("val", 5, 10, 3000),
                                    ("test", 5, 15, 30), ("val", 5, 15, 3000)):
        matrix = rng.integers(0, 60, (n, n))
        count = rng.integers(0, scale, n_bins)
        count[rng.choice(n_bins, 3, replace=False)] = 0
        bins = (rng.random(n_bins), rng.random(n_bins), count, float(rng.random()))
        fresh = plots.to_image(plots.confusion_matrix_figure(matrix, title=f"{stage} confusion"))
        np.testing.assert_array_equal(redrawn.confusion_matrix(matrix, f"{stage} confusion"), fresh)
        figure = plots.reliability_figure(*bins, title=f"{stage} reliability")
        assert figure.axes[1].get_ylim()[1] >= count.max()  # the count axis fits this data, not the last
        np.testing.assert_array_equal(redrawn.reliability(*bins, f"{stage} reliability"),
                                      plots.to_image(figure))


def hand_scores(rows: list[list[float]], target: list[int], normalise) -> dict[str, float]:
    """NLL, Brier, overconfidence and ECE (15 bins) in plain Python floats from `normalise(row) -> q`."""
    qs = [normalise(row) for row in rows]
    nll = sum(-math.log(q[y]) for q, y in zip(qs, target, strict=True)) / len(qs)
    brier = sum(sum((qc - (c == y)) ** 2 for c, qc in enumerate(q)) for q, y in zip(qs, target, strict=True))
    confidence = [max(q) for q in qs]
    correct = [float(q.index(max(q)) == y) for q, y in zip(qs, target, strict=True)]
    bins: dict[int, list[tuple[float, float]]] = {}
    for conf, ok in zip(confidence, correct, strict=True):
        bins.setdefault(min(int(conf * N_BINS), N_BINS - 1), []).append((conf, ok))
    ece = sum(abs(sum(c for c, _ in b) - sum(o for _, o in b)) for b in bins.values()) / len(qs)
    return {"nll": nll, "brier": brier / len(qs), "ece": ece,
            "overconfidence": (sum(confidence) - sum(correct)) / len(qs)}


def normalised_sigmoid(row):
    s = [1 / (1 + math.exp(-z)) for z in row]
    return [v / sum(s) for v in s]


def softmax_row(row):
    e = [math.exp(z) for z in row]
    return [v / sum(e) for v in e]


ROWS = [[2.0, 0.0, -1.0], [0.5, 1.5, -2.0], [-3.0, 4.0, 3.5], [0.1, 0.2, 0.3]]
TARGET = [0, 1, 2, 2]


@pytest.mark.parametrize(("probability_map", "normalise"),
                         [("sigmoid", normalised_sigmoid), ("softmax", softmax_row)])
def test_calibration_and_scores_use_the_loss_probability_map(probability_map, normalise):
    logits, target = torch.tensor(ROWS), torch.tensor(TARGET)
    metrics, values = computed("multiclass", logits, target, chunks=2, probability_map=probability_map)
    expected = hand_scores(ROWS, TARGET, normalise)
    for name, value in expected.items():
        assert values[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    other = hand_scores(ROWS, TARGET, softmax_row if probability_map == "sigmoid" else normalised_sigmoid)
    assert values["nll"] != pytest.approx(other["nll"], rel=1e-3)  # the two maps really differ here
    (probs,), _ = metrics.kept_predictions()
    np.testing.assert_allclose(probs.numpy(), [normalise(row) for row in ROWS], rtol=1e-5)


def test_multilabel_scores_stay_per_label_sigmoid_and_a_bad_map_is_refused():
    logits, target = fixed_predictions(200, 4, seed=3, multilabel=True)
    _, sigmoid = computed("multilabel", logits, target, probability_map="sigmoid")
    _, softmax = computed("multilabel", logits, target, probability_map="softmax")
    assert sigmoid == softmax
    with pytest.raises(ValueError, match="probability_map must be one of softmax, sigmoid, got 'probit'"):
        StageMetrics("multiclass", 3, probability_map="probit")


def test_module_measures_with_the_probability_map_its_loss_declares():
    loss = torch.nn.BCEWithLogitsLoss()
    loss.probability_map = "sigmoid"
    module = single_run_module(torch.nn.Linear(3, 4), loss)
    assert {m.probability_map for m in module.metrics.values()} == {"sigmoid"}
    plain = single_run_module(torch.nn.Linear(3, 4), torch.nn.CrossEntropyLoss())
    assert {m.probability_map for m in plain.metrics.values()} == {"softmax"}


def planted(temperature: float, probability_map: str, n: int = 20000, c: int = 4, seed: int = 0):
    """Labels drawn from the map of true logits z; the model reports temperature * z (over-confident)."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=generator, dtype=torch.float64) * 1.5
    q = probabilities(z, "multiclass", probability_map)
    target = torch.multinomial(q, 1, generator=generator).squeeze(1)
    return z * temperature, target


@pytest.mark.parametrize("probability_map", ["softmax", "sigmoid"])
def test_temperature_scaling_recovers_a_planted_temperature_and_lowers_nll(probability_map):
    logits, target = planted(2.5, probability_map)
    assert fit_temperature(logits, target, "multiclass", probability_map) == pytest.approx(2.5, rel=0.05)
    test_logits, test_target = planted(2.5, probability_map, seed=1)
    scaled = temperature_scaled(logits, target, test_logits, test_target, "multiclass", probability_map)
    raw = hand_scores(test_logits.tolist()[:2000], test_target.tolist()[:2000],
                      normalised_sigmoid if probability_map == "sigmoid" else softmax_row)
    assert scaled["temperature"] == pytest.approx(2.5, rel=0.05)
    assert scaled["ts_nll"] < raw["nll"] and scaled["ts_ece"] < raw["ece"]
    assert scaled["ts_overconfidence"] == pytest.approx(0.0, abs=0.02)  # over-confidence removed
    assert raw["overconfidence"] > 0.05


def test_temperature_scaling_of_multilabel_logits_fits_per_label_sigmoids():
    generator = torch.Generator().manual_seed(2)
    z = torch.randn(5000, 3, generator=generator, dtype=torch.float64)
    target = torch.bernoulli(torch.sigmoid(z), generator=generator)
    assert fit_temperature(0.5 * z, target, "multilabel") == pytest.approx(0.5, rel=0.08)


def test_logit_adjustment_matches_a_hand_computation():
    logits = torch.tensor([[1.0, 0.5], [0.2, 0.0], [0.0, 0.3], [2.0, -1.0]])
    target = torch.tensor([0, 1, 1, 0])
    # priors 0.9, 0.1: z - log pi adds 0.105 to class 0 and 2.303 to class 1, so rows 0-2 go to class 1
    # (row 0 wrongly), row 3 stays class 0: recall 1/2 for class 0, 2/2 for class 1 (the minority).
    values = logit_adjusted(logits, target, torch.tensor([90, 10]))
    # Macro-F1: class 0 precision 1, recall 1/2 (F1 2/3); class 1 precision 2/3, recall 1 (F1 4/5).
    assert values == pytest.approx({"la_accuracy": 0.75, "la_balanced_accuracy": 0.75,
                                    "la_macro_f1": (2 / 3 + 4 / 5) / 2, "la_minority_recall": 1.0})
    assert logit_adjusted(logits, target, torch.tensor([90, 10]), tau=0.0) == pytest.approx(
        {"la_accuracy": 0.75, "la_balanced_accuracy": 0.75, "la_macro_f1": (4 / 5 + 2 / 3) / 2,
         "la_minority_recall": 0.5})


def hand_classwise_ece(probs: np.ndarray, target: np.ndarray) -> float:
    """(1/C) sum_c sum_b (n_bc / N) |freq_bc - conf_bc| with 15 equal-width bins, looped by hand."""
    n, c = probs.shape
    total = 0.0
    for k in range(c):
        for b in range(N_BINS):
            low, high = b / N_BINS, (b + 1) / N_BINS
            upper = probs[:, k] < high if b < N_BINS - 1 else probs[:, k] <= high
            inside = (probs[:, k] >= low) & upper
            if inside.any():
                total += inside.sum() / n * abs(np.mean(target[inside] == k) - probs[inside, k].mean())
    return total / c


def test_classwise_ece_matches_a_hand_computation():
    logits, target = fixed_predictions(400, 4, seed=3)
    values = shift_calibration(logits, target, "multiclass")
    expected = hand_classwise_ece(torch.softmax(logits.double(), 1).numpy(), target.numpy())
    assert values["classwise_ece"] == pytest.approx(expected, rel=1e-6)  # probabilities in float32
    assert "prior_corrected_ece" not in values  # no training counts: no prior to correct from


@pytest.mark.parametrize("probability_map", ["softmax", "sigmoid"])
def test_prior_correction_removes_the_miscalibration_a_prior_shift_causes(probability_map):
    # A model calibrated on a long-tailed training prior, tested on a balanced split: its logits are the
    # balanced truth's plus log pi_train. Raw ECE is large, the prior-corrected ECE is binning noise.
    generator = torch.Generator().manual_seed(4)
    z = torch.randn(20000, 4, generator=generator, dtype=torch.float64)
    target = torch.multinomial(torch.softmax(z, 1), 1, generator=generator).squeeze(1)
    counts = torch.tensor([800.0, 200.0, 50.0, 8.0])
    prior = counts / counts.sum()
    logits = torch.log_softmax(z, 1) + prior.log()
    if probability_map == "sigmoid":  # the same probabilities under the normalised-sigmoid map
        q = torch.softmax(logits, 1)
        logits = torch.log(q / (1 - q))
    values = shift_calibration(logits, target, "multiclass", probability_map, counts)
    raw = StageMetrics("multiclass", 4, probability_map=probability_map)
    raw.update(logits[None], target[None], torch.zeros(1))
    assert raw.compute()[0]["ece"] > 0.15
    assert values["prior_corrected_ece"] < 0.015


def test_the_prior_a_model_carries_follows_its_sampler_and_loss():
    from xentlab.losses.builtin import CrossEntropy, LogitAdjustedCrossEntropy, WeightedCrossEntropy

    counts = torch.tensor([900.0, 90.0, 10.0])
    uniform = torch.full((3,), 1 / 3, dtype=torch.float64)
    assert model_prior(counts, CrossEntropy()) == pytest.approx(counts.double() / 1000)
    assert model_prior(counts, CrossEntropy(), "class_balanced") == pytest.approx(uniform)
    root = counts.double().sqrt() / counts.sqrt().sum()
    assert model_prior(counts, CrossEntropy(), "sqrt") == pytest.approx(root)
    # Inverse-frequency weights and balanced softmax (tau = 1) both fit the balanced posterior.
    weighted = WeightedCrossEntropy(weights="inverse_frequency", beta=0.999, class_counts=counts)
    assert model_prior(counts, weighted) == pytest.approx(uniform)
    balanced_softmax = LogitAdjustedCrossEntropy(tau=1.0, class_counts=counts)
    assert model_prior(counts, balanced_softmax) == pytest.approx(uniform)
    assert model_prior(counts, LogitAdjustedCrossEntropy(tau=0.5, class_counts=counts)) == pytest.approx(root)


@pytest.mark.parametrize("task, probability_map, full", [
    ("multiclass", "softmax", True), ("multiclass", "sigmoid", True), ("multiclass", "softmax", False),
    ("multilabel", "sigmoid", True)])
def test_a_seed_batch_gives_every_seed_the_values_it_has_alone(task, probability_map, full):
    # Three seeds' batches folded in one pass give each seed what a one-seed StageMetrics gives it from the
    # same batches (NaN logits of one seed included): the counts' metrics and the kept logits to the bit;
    # sums of probabilities within float32 rounding (an elementwise exp may round a value differently
    # where it falls in a vector register).
    torch.manual_seed(3)
    seeds, classes = 3, 4
    alone = [StageMetrics(task, classes, full=full, keep_predictions=full, probability_map=probability_map)
             for _ in range(seeds)]
    batched = StageMetrics(task, classes, seeds, full=full, keep_predictions=full,
                           probability_map=probability_map)
    for size in (17, 64, 5):
        logits = torch.randn(seeds, size, classes) * 3
        if size == 5:
            logits[2, 1] = float("nan")
        target = (torch.rand(seeds, size, classes) < 0.4).float() if task == "multilabel" \
            else torch.randint(0, classes, (seeds, size))
        losses = torch.rand(seeds)
        batched.update(logits, target, losses)
        for k in range(seeds):
            alone[k].update(logits[k:k + 1], target[k:k + 1], losses[k:k + 1])
    summed = {"loss", "nll", "brier", "ece", "overconfidence", "map"}
    for own, got in zip(alone, batched.compute(), strict=True):
        expected = own.compute()[0]
        assert list(got) == list(expected)
        for name, value in expected.items():
            if name in summed:
                assert got[name] == pytest.approx(value, rel=1e-6, nan_ok=True), name
            else:
                assert got[name] == value or (math.isnan(got[name]) and math.isnan(value)), name
    for k, own in enumerate(alone):
        torch.testing.assert_close(batched.confusion_matrix()[k], own.confusion_matrix()[0], rtol=0, atol=0)
        if full:
            for g, e in zip(batched.kept_logits(), own.kept_logits(), strict=True):
                torch.testing.assert_close(g[k], e[0], rtol=0, atol=0, equal_nan=True)
    batched.update(logits, target, losses)
    batched.reset()  # drops what it holds as well as what every seed counted
    assert not batched._held and int(batched.tally.rows) == 0 and not batched.tally.counts.any()


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_the_counted_metrics_are_torchmetrics_own_values_to_the_bit(task):
    # Each seed's row of counts reduced at once gives what torchmetrics' metric class gives that seed's
    # decisions alone.
    torch.manual_seed(5)
    seeds, classes, n = 4, 5, 300
    logits = torch.randn(seeds, n, classes) * 2
    if task == "multilabel":
        target = (torch.rand(seeds, n, classes) < 0.3).long()
        target[1, :, 2] = 0  # a label that is never on
        reference = {"hamming_loss": tmc.MultilabelHammingDistance(classes, average="micro"),
                     "micro_f1": tmc.MultilabelF1Score(classes, average="micro"),
                     "macro_f1": tmc.MultilabelF1Score(classes, average="macro"),
                     "recall": tmc.MultilabelRecall(classes, average="none"),
                     "specificity": tmc.MultilabelSpecificity(classes, average="none")}
        decided = [torch.sigmoid(logits[k]) for k in range(seeds)]
    else:
        target = torch.multinomial(torch.tensor([0.6, 0.25, 0.1, 0.05, 0.0]), seeds * n, replacement=True)
        target = target.view(seeds, n)  # class 4 never occurs: macro averages must leave it out
        reference = {"accuracy": tmc.MulticlassAccuracy(classes, average="micro"),
                     "balanced_accuracy": tmc.MulticlassAccuracy(classes, average="macro"),
                     "macro_f1": tmc.MulticlassF1Score(classes, average="macro"),
                     "recall": tmc.MulticlassRecall(classes, average="none")}
        decided = [logits[k].argmax(1) for k in range(seeds)]
    metrics = StageMetrics(task, classes, seeds)
    metrics.update(logits, target, torch.zeros(seeds))
    stats = decision_stats(metrics.confusion_matrix(), task)
    counted = counted_metrics(task, full=True)
    assert set(counted) == set(reference)
    for name, metric in reference.items():
        got = counted[name](*stats)
        for k in range(seeds):
            metric.reset()
            torch.testing.assert_close(got[k], metric(decided[k], target[k]), rtol=0, atol=0, msg=name)


def test_stage_metrics_refuse_batches_without_their_seed_axis():
    metrics = StageMetrics("multiclass", 3, 2)
    with pytest.raises(ValueError, match=r"expected logits of shape \(2, batch, classes\), got \(5, 3\)"):
        metrics.update(torch.zeros(5, 3), torch.zeros(5, dtype=torch.long), torch.zeros(2))
