"""Evaluation metrics for imbalanced classification, built on torchmetrics; conventions in docs/metrics.md.

`StageMetrics` holds one stage's (train / val / test) streaming metrics and returns plain
`name -> float` dicts; per-class vectors are expanded to `recall_class_<c>`. The scores torchmetrics
lacks (NLL, Brier, binned calibration) are small `torchmetrics.Metric`s here, so they sync across
processes like the rest. Probabilities follow the loss's `probability_map` ("softmax", or "sigmoid":
normalised one-vs-rest sigmoids) and use torch's own functions, never the losses under study.
`temperature_scaled` and `logit_adjusted` are the post-hoc adjustments logged at test, `shift_calibration`
the calibration figures that separate a train/test prior shift from miscalibration.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torchmetrics import classification as tmc
from torchmetrics.functional import classification as tmf

N_BINS = 15
PROBABILITY_MAPS = ("softmax", "sigmoid")


def check_probability_map(probability_map: str) -> str:
    """`probability_map` itself if it is one of PROBABILITY_MAPS, else a ValueError naming the choices."""
    if probability_map not in PROBABILITY_MAPS:
        raise ValueError(
            f"probability_map must be one of {', '.join(PROBABILITY_MAPS)}, got {probability_map!r}")
    return probability_map


def _float(logits: torch.Tensor) -> torch.Tensor:
    """float32 for every floating dtype but float64, which stays (post-hoc fits run in float64)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def log_probabilities(logits: torch.Tensor, probability_map: str = "softmax") -> torch.Tensor:
    """Single-label log-probabilities log q of (N, C) logits, in float32 (float64 stays float64).

    softmax: q = softmax(z). sigmoid (a one-vs-rest model: bce, sigmoid focal, mse on logits):
    q_c = sigmoid(z_c) / sum_k sigmoid(z_k), computed as log sigmoid(z_c) - logsumexp_k log sigmoid(z_k).
    """
    logits = _float(logits)
    if check_probability_map(probability_map) == "sigmoid":
        log_s = F.logsigmoid(logits)
        return log_s - torch.logsumexp(log_s, dim=1, keepdim=True)
    return torch.log_softmax(logits, dim=1)


def probabilities(logits: torch.Tensor, task: str, probability_map: str = "softmax") -> torch.Tensor:
    """The model's probabilities: for single-label tasks exp(log_probabilities(logits, probability_map))
    (rows sum to 1); for multilabel sigmoid(logits) per label, whatever the map."""
    if task == "multilabel":
        return torch.sigmoid(_float(logits))
    return log_probabilities(logits, probability_map).exp()


def nll_sum(logits: torch.Tensor, target: torch.Tensor, task: str, probability_map: str = "softmax",
            log_q: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(sum, count) of the negative log-likelihood: -log q_y per sample (single-label, q as in
    `log_probabilities`, or `log_q` when already computed), or -[t log s + (1-t) log(1-s)],
    s = sigmoid(z), per (sample, label) element."""
    if task == "multilabel":
        logits = _float(logits)
        total = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="sum")
        return total, target.numel()
    log_q = log_probabilities(logits, probability_map) if log_q is None else log_q
    return -log_q.gather(1, target.long().unsqueeze(1)).sum(), len(target)


def brier_sum(logits: torch.Tensor, target: torch.Tensor, task: str, probability_map: str = "softmax",
              probs: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(sum, count) of the Brier score: sum_c (q_c - [c = y])^2 per sample (single-label), or (s - t)^2
    per (sample, label) element (multilabel); `probs`: `probabilities` when already computed."""
    probs = probabilities(logits, task, probability_map) if probs is None else probs
    if task == "multilabel":
        return ((probs - target.to(probs.dtype)) ** 2).sum(), target.numel()
    one_hot = F.one_hot(target.long(), logits.shape[1]).to(probs.dtype)
    return ((probs - one_hot) ** 2).sum(), len(target)


def top_label(probs: torch.Tensor, target: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, correct) of each decision: the top class for single-label data, each (sample, label)
    pair's 0/1 decision for multilabel data (confidence max(p, 1 - p), threshold 0.5)."""
    if task == "multilabel":
        p, t = probs.flatten(), target.flatten()
        return torch.maximum(p, 1 - p), ((p >= 0.5) == (t >= 0.5)).float()
    confidence, predicted = probs.max(dim=1)
    return confidence, (predicted == target).float()


class Reliability(NamedTuple):
    """Per-bin mean confidence, accuracy (fraction correct) and count; empty bins hold 0."""

    confidence: torch.Tensor
    accuracy: torch.Tensor
    count: torch.Tensor

    @property
    def ece(self) -> float:
        """ECE = sum_b (n_b / N) * |accuracy_b - confidence_b|."""
        total = self.count.sum()
        if not total:
            return float("nan")
        return float((self.count / total * (self.accuracy - self.confidence).abs()).sum())

    @property
    def overconfidence(self) -> float:
        """Mean top-label confidence minus accuracy over all decisions (> 0: over-confident)."""
        total = self.count.sum()
        if not total:
            return float("nan")
        return float((self.count * (self.confidence - self.accuracy)).sum() / total)


def bin_index(confidence: torch.Tensor, n_bins: int = N_BINS) -> torch.Tensor:
    """Equal-width bin of each confidence: bin k = [k/B, (k+1)/B), the last bin closed at 1."""
    edges = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype, device=confidence.device)[1:-1]
    return torch.bucketize(confidence, edges, right=True)


class CalibrationBins(torchmetrics.Metric):
    """Streaming reliability bins on top-label confidence (B equal-width bins); `compute` gives ECE."""

    full_state_update = False

    def __init__(self, task: str, n_bins: int = N_BINS, **kwargs):
        super().__init__(**kwargs)
        self.task, self.n_bins = task, n_bins
        for name in ("confidence_sum", "correct_sum", "count"):
            self.add_state(name, torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        confidence, correct = top_label(probs, target, self.task)
        index = bin_index(confidence, self.n_bins)
        self.confidence_sum.index_add_(0, index, confidence.double())
        self.correct_sum.index_add_(0, index, correct.double())
        self.count.index_add_(0, index, torch.ones_like(confidence, dtype=torch.float64))

    def bins(self) -> Reliability:
        """The bins so far (mean confidence, accuracy, count per bin)."""
        safe = self.count.clamp(min=1)
        return Reliability(self.confidence_sum / safe, self.correct_sum / safe, self.count)

    def compute(self) -> torch.Tensor:
        return torch.tensor(self.bins().ece)


class RunningMean(torchmetrics.Metric):
    """A mean kept as a running (sum, count) in float64. NaN is not checked for, so it propagates and
    costs no device sync."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def add(self, total: torch.Tensor, n: int) -> None:
        self.total += total.double()
        self.n += n

    def update(self, total: torch.Tensor, n: int) -> None:
        """Adds items whose values sum to `total`."""
        self.add(total, n)

    def compute(self) -> torch.Tensor:
        return self.total / self.n


class BatchMean(RunningMean):
    """The mean over samples of per-batch means, each weighted by its batch size. (torchmetrics'
    MeanMetric ignores the weights when its NaN check is off, as of 1.9, and the check syncs.)"""

    def update(self, batch_means: torch.Tensor, batch_sizes: torch.Tensor) -> None:
        """Adds k batches: their means and sizes, two tensors of shape (k,)."""
        sizes = batch_sizes.to(device=batch_means.device, dtype=torch.float64)
        self.add((batch_means.double() * sizes).sum(), int(batch_sizes.sum()))


class Predictions(torchmetrics.Metric):
    """Every logit row and target of the stage, concatenated (PR curves, confusion matrices, post-hoc)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("logits", [], dist_reduce_fx="cat")
        self.add_state("target", [], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.logits.append(logits)
        self.target.append(target)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        cat = torchmetrics.utilities.dim_zero_cat
        return cat(self.logits), cat(self.target)


def _probability_metrics(task: str, num_classes: int, full: bool) -> dict[str, torchmetrics.Metric]:
    """torchmetrics metrics updated with the probabilities (multilabel data) or with the predicted classes,
    their argmax (single-label data: every one here counts decisions, and the argmax is taken once for
    all of them; a single-label metric that needs the probabilities themselves goes beside `calibration`
    in `StageMetrics.add`)."""
    # torchmetrics' multiclass default is average="macro"; every average is spelled out on purpose.
    if task == "multilabel":
        light = {"hamming_loss": tmc.MultilabelHammingDistance(num_classes, average="micro")}
        more = {"micro_f1": tmc.MultilabelF1Score(num_classes, average="micro"),
                "macro_f1": tmc.MultilabelF1Score(num_classes, average="macro"),
                "map": tmc.MultilabelAveragePrecision(num_classes, average="macro"),
                "exact_match": tmc.MultilabelExactMatch(num_classes),
                "recall": tmc.MultilabelRecall(num_classes, average="none"),
                "specificity": tmc.MultilabelSpecificity(num_classes, average="none")}
    else:
        light = {"accuracy": tmc.MulticlassAccuracy(num_classes, average="micro"),
                 "balanced_accuracy": tmc.MulticlassAccuracy(num_classes, average="macro")}
        more = {"macro_f1": tmc.MulticlassF1Score(num_classes, average="macro"),
                "recall": tmc.MulticlassRecall(num_classes, average="none")}
    return {**light, **more} if full else light


class StageMetrics(nn.Module):
    """One stage's metrics. `full=False` keeps the cheap ones (for training steps); `keep_predictions`
    also stores logits and targets for PR curves, the confusion matrix and post-hoc adjustments.
    `probability_map` is the loss's ("softmax" or "sigmoid", see `log_probabilities`).

    Batches are held back and folded into the metrics together, once `hold_elements` logits are
    waiting and before every `compute`: a torchmetrics update costs 30-400 µs whatever the batch size,
    and with ten metrics that is more than a small model's whole training step. Held batches are views
    of tensors the step made anyway, so holding them costs at most `hold_elements` logits of memory.
    """

    def __init__(self, task: str, num_classes: int, *, full: bool = True, keep_predictions: bool = False,
                 hold_elements: int = 1 << 20, probability_map: str = "softmax"):
        super().__init__()
        self.task, self.num_classes, self.hold_elements = task, num_classes, hold_elements
        self.probability_map = check_probability_map(probability_map)
        self.loss = BatchMean()  # the loss under study, averaged over the stage's samples
        self.on_probs = nn.ModuleDict(_probability_metrics(task, num_classes, full))
        # Means of `nll_sum` and `brier_sum`, fed from the probabilities every metric shares (`add`).
        self.on_logits = nn.ModuleDict({"nll": RunningMean(), "brier": RunningMean()} if full else {})
        self.calibration = CalibrationBins(task) if full else None
        self.predictions = Predictions() if keep_predictions else None
        self._held: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._held_elements = 0

    def update(self, logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> None:
        """Adds a batch: its (detached) logits, targets and the value of the batch-mean loss under study."""
        self._held.append((logits, target, loss))
        self._held_elements += logits.numel()
        if self._held_elements >= self.hold_elements:
            self._fold()

    def _fold(self) -> None:
        """Updates every metric once with all held batches."""
        if not self._held:
            return
        logits, target, losses = zip(*self._held, strict=True)
        self._held, self._held_elements = [], 0
        sizes = torch.tensor([len(t) for t in target])
        self.add(torch.cat(logits), torch.cat(target), torch.stack(losses), sizes)

    def shared_log_q(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Softmax log-probabilities of (..., N, C) logits with any leading axes (a seed axis) in one call,
        or None where the map is elementwise (sigmoid, multilabel). A row-wise kernel gives every row the
        bits it gets alone; an elementwise one (exp, sigmoid) may round a value differently where it
        falls in a vector register, so `add` applies those per seed."""
        if self.task == "multilabel" or self.probability_map != "softmax":
            return None
        return log_probabilities(logits.reshape(-1, logits.shape[-1])).reshape(logits.shape)

    def add(self, logits: torch.Tensor, target: torch.Tensor, losses: torch.Tensor, sizes: torch.Tensor,
            log_q: torch.Tensor | None = None) -> None:
        """Updates every metric with a stage's batches at once: their logits and targets concatenated, each
        batch's mean loss and size, and `log_q`, the log-probabilities when already computed. The
        probabilities and the predicted classes are computed once for all metrics."""
        self.loss.update(losses, sizes)
        if self.task == "multilabel":
            probs, decided, probs_target = probabilities(logits, self.task), None, target.long()
        else:
            log_q = log_probabilities(logits, self.probability_map) if log_q is None else log_q
            probs = log_q.exp()
            # What torchmetrics does with probabilities, once for all its metrics.
            decided = probs.argmax(dim=1)
            probs_target = target
        for metric in self.on_probs.values():
            metric.update(probs if decided is None else decided, probs_target)
        if self.on_logits:
            task, probability_map = self.task, self.probability_map
            self.on_logits["nll"].update(*nll_sum(logits, target, task, probability_map, log_q=log_q))
            self.on_logits["brier"].update(*brier_sum(logits, target, task, probability_map, probs=probs))
        if self.calibration is not None:
            self.calibration.update(probs, target)
        if self.predictions is not None:
            self.predictions.update(logits, target)

    def compute(self) -> dict[str, float]:
        """name -> value; `recall` becomes `recall_class_<c>`, and for multilabel data
        balanced_accuracy = mean_l (recall_l + specificity_l) / 2."""
        self._fold()
        values = {name: metric.compute()
                  for name, metric in {"loss": self.loss, **self.on_probs, **self.on_logits}.items()}
        if self.calibration is not None:
            bins = self.calibration.bins()
            values["ece"], values["overconfidence"] = bins.ece, bins.overconfidence
        if "specificity" in values:
            values["balanced_accuracy"] = ((values["recall"] + values.pop("specificity")) / 2).mean()
        out = {}
        for name, value in values.items():
            if name == "recall":
                out.update({f"recall_class_{c}": float(v) for c, v in enumerate(value)})
            else:
                out[name] = float(value)
        return out

    def confusion_matrix(self) -> torch.Tensor:
        """(C, C) counts, rows = true class; for multilabel (L, 2, 2) per label, [[TN, FP], [FN, TP]]."""
        probs, target = self.kept_predictions()
        if self.task == "multilabel":
            return tmf.multilabel_confusion_matrix(probs, target.long(), self.num_classes)
        return tmf.multiclass_confusion_matrix(probs, target, self.num_classes)

    def kept_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every logit row and target of the stage so far (`keep_predictions=True` only)."""
        self._fold()
        return self.predictions.compute()

    def kept_predictions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every probability row (the model's probability map) and target of the stage so far."""
        logits, target = self.kept_logits()
        return probabilities(logits, self.task, self.probability_map), target

    def reset(self) -> None:
        self._held, self._held_elements = [], 0
        for metric in self.modules():
            if isinstance(metric, torchmetrics.Metric):
                metric.reset()


class SeedStages:
    """One stage's metrics for the K seeds of a batch, `stages[k]` seed k's `StageMetrics`: a step's batch
    is held once for all seeds ((K, B, C) logits, (K, B) targets, (K,) losses), and at the fold the
    batches are joined and the softmax log-probabilities computed for all seeds in one pass
    (`StageMetrics.shared_log_q`) before each seed's metrics take their slice. Seed k's values are, to the
    bit, those its `StageMetrics` computes alone (tests/test_metrics.py). Fold before reading any seed's
    metrics."""

    def __init__(self, stages: list[StageMetrics]):
        self.stages, self._held, self._held_elements = list(stages), [], 0
        first = self.stages[0]
        # Seeds whose metrics map logits to probabilities alike share the computation.
        self._shared = all((s.task, s.probability_map) == (first.task, first.probability_map)
                           for s in self.stages)

    def update(self, logits: torch.Tensor, target: torch.Tensor, losses: torch.Tensor) -> None:
        self._held.append((logits, target, losses))
        self._held_elements += logits.numel()
        if self._held_elements >= self.stages[0].hold_elements * len(self.stages):
            self.fold()

    def fold(self) -> None:
        """Updates every seed's metrics with all held batches."""
        if not self._held:
            return
        logits, target, losses = zip(*self._held, strict=True)
        self._held, self._held_elements = [], 0
        sizes = torch.tensor([t.shape[1] for t in target])
        logits, target = torch.cat(logits, dim=1), torch.cat(target, dim=1)
        losses = torch.stack(losses, dim=1)  # (K, batches)
        log_q = self.stages[0].shared_log_q(logits) if self._shared else None
        for k, stage in enumerate(self.stages):
            stage.add(logits[k], target[k], losses[k], sizes, None if log_q is None else log_q[k])

    def reset(self) -> None:
        self._held, self._held_elements = [], 0
        for stage in self.stages:
            stage.reset()


# --- post-hoc adjustments (fitted or applied after training; docs/metrics.md) ---------------------------

def calibration_scores(logits: torch.Tensor, target: torch.Tensor, task: str,
                       probability_map: str = "softmax") -> dict[str, float]:
    """ECE, overconfidence (mean confidence - accuracy), NLL and Brier of one set of predictions,
    by the same definitions as `StageMetrics`."""
    bins = CalibrationBins(task).to(logits.device)
    bins.update(probabilities(logits, task, probability_map), target)
    reliability = bins.bins()
    scores = {"ece": reliability.ece, "overconfidence": reliability.overconfidence}
    for name, score in (("nll", nll_sum), ("brier", brier_sum)):
        total, count = score(logits, target, task, probability_map)
        scores[name] = float(total) / count
    return scores


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, task: str, probability_map: str = "softmax",
                    bounds: tuple[float, float] = (0.01, 100.0)) -> float:
    """Temperature scaling (Guo et al. 2017): T = argmin_T mean NLL(z / T), T in `bounds`.

    One parameter, so a bounded Brent search over log T (scipy's `minimize_scalar`) in float64 finds it
    without a learning rate; NLL is `nll_sum` under the model's probability map (per-label sigmoids
    for multilabel data). Fitted on validation logits, never on test.
    """
    from scipy.optimize import minimize_scalar  # scipy's import is paid only when a run ends

    logits, target = logits.detach().double().cpu(), target.detach().cpu()

    def mean_nll(log_t: float) -> float:
        total, count = nll_sum(logits / math.exp(log_t), target, task, probability_map)
        return float(total) / count

    found = minimize_scalar(mean_nll, bounds=tuple(math.log(b) for b in bounds), method="bounded",
                            options={"xatol": 1e-6})
    return math.exp(found.x)


def temperature_scaled(fit_logits: torch.Tensor, fit_target: torch.Tensor, logits: torch.Tensor,
                       target: torch.Tensor, task: str, probability_map: str = "softmax") -> dict[str, float]:
    """`temperature` fitted on (fit_logits, fit_target) and `ts_<score>` of `calibration_scores` on
    logits / temperature. Dividing by T > 0 keeps every argmax, so only calibration changes."""
    temperature = fit_temperature(fit_logits, fit_target, task, probability_map)
    scores = calibration_scores(_float(logits) / temperature, target, task, probability_map)
    return {"temperature": temperature, **{f"ts_{name}": value for name, value in scores.items()}}


def logit_adjusted(logits: torch.Tensor, target: torch.Tensor, class_counts: torch.Tensor,
                   tau: float = 1.0) -> dict[str, float]:
    """Post-hoc logit adjustment (Menon et al. 2021): decide argmax_c (z_c - tau * log pi_c), pi the
    training split's class priors n_c / sum_k n_k. Returns `la_accuracy`, `la_balanced_accuracy`,
    `la_macro_f1` and `la_minority_recall` (recall of the class with the fewest training samples) of those
    decisions. Single-label data only."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64, device=logits.device)
    log_prior = (counts / counts.sum()).log()
    predicted = (logits.double() - tau * log_prior).argmax(dim=1)
    num_classes = logits.shape[1]
    recall = tmf.multiclass_recall(predicted, target, num_classes, average="none")
    return {"la_accuracy": float(tmf.multiclass_accuracy(predicted, target, num_classes, average="micro")),
            "la_balanced_accuracy": float(tmf.multiclass_accuracy(predicted, target, num_classes,
                                                                  average="macro")),
            "la_macro_f1": float(tmf.multiclass_f1_score(predicted, target, num_classes, average="macro")),
            "la_minority_recall": float(recall[int(counts.argmin())])}


def classwise_ece(probs: torch.Tensor, target: torch.Tensor, task: str, n_bins: int = N_BINS) -> float:
    """Classwise ECE (Kull et al. 2019): (1/C) sum_c sum_b (n_bc / N) |freq_bc - conf_bc|, the binned
    calibration of every class's probability p_c over all samples (bins as `bin_index`), where freq_bc is
    the fraction of bin b's samples whose label is c (for multilabel data: whose label c is on)."""
    probs = probs.double()
    hits = target.double() if task == "multilabel" else F.one_hot(target.long(), probs.shape[1]).double()
    n, classes = probs.shape
    index = bin_index(probs, n_bins) + n_bins * torch.arange(classes, device=probs.device)  # (N, C) bins
    # (n_bc / N) |freq_bc - conf_bc| = |sum over the bin's samples of (hit - p_c)| / N
    gap = torch.zeros(classes * n_bins, dtype=torch.float64, device=probs.device).index_add_(
        0, index.flatten(), (hits - probs).flatten())
    return float(gap.abs().sum() / (n * classes)) if n else float("nan")


def prior_corrected(logits: torch.Tensor, probability_map: str, train_prior: torch.Tensor,
                    test_prior: torch.Tensor) -> torch.Tensor:
    """Log-probabilities moved from the training prior to the test prior (Saerens et al. 2002):
    q'_c ∝ q_c · π_test,c / π_train,c, q the model's probabilities. A softmax model's q' is
    softmax(z - log π_train + log π_test); with a balanced test split, softmax(z - log π_train)."""
    shift = (test_prior.double() / train_prior.double()).log().to(logits.device)
    return torch.log_softmax(log_probabilities(logits, probability_map).double() + shift, dim=1)


def model_prior(class_counts, loss: nn.Module | None = None, sampler: str = "instance") -> torch.Tensor:
    """The class prior a trained model's probabilities carry, from the training counts n_c, how batches were
    drawn and what the loss does to the prior: π_batch (n_c / Σ n_k; uniform for the `class_balanced`
    sampler, ∝ √n_c for `sqrt`), times w_c for a loss with per-class weights w (the minimiser of weighted
    CE is q_c ∝ w_c p(c | x)), times π_c^(−τ) for logit-adjusted CE (softmax(z + τ log π) fits the batch
    posterior, so softmax(z) carries π_batch / π^τ; τ = 1, balanced softmax: uniform on instance batches).
    Other losses (focal, label smoothing, LDAM, ...) are taken to fit the batch prior."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64).cpu()
    prior = {"class_balanced": torch.ones_like(counts), "sqrt": counts.sqrt()}.get(sampler, counts)
    weight = getattr(loss, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.shape == counts.shape:
        prior = prior * weight.detach().double().cpu()
    log_prior, tau = getattr(loss, "log_prior", None), getattr(loss, "tau", None)
    if isinstance(log_prior, torch.Tensor) and isinstance(tau, (int, float)):
        prior = prior * torch.exp(-tau * log_prior.detach().double().cpu())
    return prior / prior.sum()


def shift_calibration(logits: torch.Tensor, target: torch.Tensor, task: str, probability_map: str = "softmax",
                      class_counts=None, prior: torch.Tensor | None = None) -> dict[str, float]:
    """`classwise_ece` of the model's probabilities and, for single-label data with known training counts,
    `prior_corrected_ece`: the ECE (same bins as `ece`) of the probabilities moved from the prior they carry
    (`prior`, see `model_prior`; by default the training split's) to the test split's class prior (its label
    frequencies) by `prior_corrected`. When training and test priors differ (a long-tailed training split, a
    balanced test split), raw ECE mostly measures that shift; the corrected figure measures the
    miscalibration that is left (docs/metrics.md)."""
    values = {"classwise_ece": classwise_ece(probabilities(logits, task, probability_map), target, task)}
    if task == "multilabel" or class_counts is None:
        return values
    counts = torch.as_tensor(class_counts, dtype=torch.float64).cpu()
    prior = counts / counts.sum() if prior is None else prior.double().cpu()
    test_counts = torch.bincount(target.long().cpu(), minlength=logits.shape[1]).double()
    if (prior <= 0).any() or (test_counts <= 0).any():
        return values  # a class absent from one split has no prior ratio
    log_q = prior_corrected(logits, probability_map, prior, test_counts / test_counts.sum())
    bins = CalibrationBins(task).to(logits.device)
    bins.update(log_q.exp(), target)
    return {**values, "prior_corrected_ece": bins.bins().ece}


def loss_curve(loss: Callable, p_true: torch.Tensor, *, task: str, num_classes: int, true_class: int = 0,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, gradient size) of one sample as functions of its true-class probability p.

    Single-label: logits x_y = log p, x_c = log((1 - p) / (C - 1)) for c != y, so softmax(x)_y = p and
    the rest share 1 - p evenly; target y = `true_class`; gradient size ||d loss / d x||_2. Multilabel:
    all L logits = log(p / (1 - p)), every label positive, so each sigmoid is p; for a loss averaged over
    labels the gradient size sqrt(L) * ||d loss / d x||_2 is the RMS over labels of d loss_l / d x_l.
    Each point is its own batch of one.
    """
    values, grads = [], []
    for p in p_true.double().tolist():
        if task == "multilabel":
            row = torch.full((1, num_classes), math.log(p / (1 - p)), device=device)
            target = torch.ones(1, num_classes, device=device)
        else:
            row = torch.full((1, num_classes), math.log((1 - p) / (num_classes - 1)), device=device)
            row[0, true_class] = math.log(p)
            target = torch.tensor([true_class], device=device)
        row.requires_grad_(True)
        with torch.enable_grad():
            value = loss(row, target)
            (grad,) = torch.autograd.grad(value, row)
        values.append(float(value.detach()))
        grads.append(float(grad.norm()) * (math.sqrt(num_classes) if task == "multilabel" else 1.0))
    return torch.tensor(values), torch.tensor(grads)


def per_label(softmax_loss: Callable) -> Callable:
    """`softmax_loss` applied to each label as the 2-way problem logits [0, x_l], class t_l.

    softmax([0, x])_1 = sigmoid(x), so cross_entropy becomes binary cross-entropy and mse_loss on
    probabilities the binary Brier score (1 - sigmoid(x))^2 for a positive label; averaged over N*L.
    """
    def loss(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pairs = torch.stack([torch.zeros_like(input), input], dim=-1).reshape(-1, 2)
        return softmax_loss(pairs, target.reshape(-1).long())

    return loss
