"""Evaluation metrics for imbalanced classification, built on torchmetrics; conventions in docs/metrics.md.

`StageMetrics` holds one stage's (train / val / test) streaming metrics for the K >= 1 seeds of a run, with
a leading seed axis, and returns one plain `name -> float` dict per seed; per-class vectors are expanded
to `recall_class_<c>`. Every seed's metrics come out of one vectorised pass: one count of the decisions
((K, C, C) confusion counts), one log-softmax, one set of reliability bins for all seeds, and torchmetrics'
own reductions of the counts applied to every seed's row at once. Probabilities follow the loss's
`probability_map` ("softmax", or "sigmoid": normalised one-vs-rest sigmoids) and use torch's own
functions, never the losses under study. `temperature_scaled` and `logit_adjusted` are the post-hoc
adjustments logged at test, `shift_calibration` the calibration figures that separate a train/test prior
shift from miscalibration.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torchmetrics.functional import classification as tmf
from torchmetrics.functional.classification.accuracy import _accuracy_reduce
from torchmetrics.functional.classification.f_beta import _fbeta_reduce
from torchmetrics.functional.classification.hamming import _hamming_distance_reduce
from torchmetrics.functional.classification.precision_recall import _precision_recall_reduce
from torchmetrics.functional.classification.specificity import _specificity_reduce
from torchmetrics.utilities import dim_zero_cat

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
    """Single-label log-probabilities log q of (..., N, C) logits, in float32 (float64 stays float64).

    softmax: q = softmax(z). sigmoid (a one-vs-rest model: bce, sigmoid focal, mse on logits):
    q_c = sigmoid(z_c) / sum_k sigmoid(z_k), computed as log sigmoid(z_c) - logsumexp_k log sigmoid(z_k).
    """
    logits = _float(logits)
    if check_probability_map(probability_map) == "sigmoid":
        log_s = F.logsigmoid(logits)
        return log_s - torch.logsumexp(log_s, dim=-1, keepdim=True)
    return torch.log_softmax(logits, dim=-1)


def probabilities(logits: torch.Tensor, task: str, probability_map: str = "softmax") -> torch.Tensor:
    """The model's probabilities: for single-label tasks exp(log_probabilities(logits, probability_map))
    (rows sum to 1); for multilabel sigmoid(logits) per label, whatever the map."""
    if task == "multilabel":
        return torch.sigmoid(_float(logits))
    return log_probabilities(logits, probability_map).exp()


def nll_sum(logits: torch.Tensor, target: torch.Tensor, task: str, probability_map: str = "softmax",
            log_q: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(sum, count) of the negative log-likelihood over the samples of (..., N, C) logits, one sum per
    leading index: -log q_y per sample (single-label, q as in `log_probabilities`, or `log_q` when already
    computed), or -[t log s + (1-t) log(1-s)], s = sigmoid(z), per (sample, label) element."""
    if task == "multilabel":
        logits = _float(logits)
        each = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
        return each.flatten(-2).sum(-1), target.shape[-2] * target.shape[-1]
    log_q = log_probabilities(logits, probability_map) if log_q is None else log_q
    return -log_q.gather(-1, target.long().unsqueeze(-1)).squeeze(-1).sum(-1), target.shape[-1]


def brier_sum(logits: torch.Tensor, target: torch.Tensor, task: str, probability_map: str = "softmax",
              probs: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(sum, count) of the Brier score over the samples of (..., N, C) logits, one sum per leading index:
    sum_c (q_c - [c = y])^2 per sample (single-label), or (s - t)^2 per (sample, label) element
    (multilabel); `probs`: `probabilities` when already computed."""
    probs = probabilities(logits, task, probability_map) if probs is None else probs
    if task == "multilabel":
        squares = (probs - target.to(probs.dtype)) ** 2
        return squares.flatten(-2).sum(-1), target.shape[-2] * target.shape[-1]
    one_hot = F.one_hot(target.long(), logits.shape[-1]).to(probs.dtype)
    return ((probs - one_hot) ** 2).flatten(-2).sum(-1), target.shape[-1]


def top_label(probs: torch.Tensor, target: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, correct) of each decision, over the last axis: the top class of each sample of
    (..., N, C) single-label probabilities, each (sample, label) pair's 0/1 decision for multilabel data
    (confidence max(p, 1 - p); on where p > 0.5, as torchmetrics decides)."""
    if task == "multilabel":
        p, t = probs.flatten(-2), target.flatten(-2)
        return torch.maximum(p, 1 - p), ((p > 0.5) == (t > 0.5)).float()
    confidence, predicted = probs.max(dim=-1)
    return confidence, (predicted == target).float()


def bin_index(confidence: torch.Tensor, n_bins: int = N_BINS) -> torch.Tensor:
    """Equal-width bin of each confidence: bin k = [k/B, (k+1)/B), the last bin closed at 1."""
    edges = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype, device=confidence.device)[1:-1]
    return torch.bucketize(confidence, edges, right=True)


def reliability_sums(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = N_BINS) -> torch.Tensor:
    """(..., 3, n_bins) float64 sums over the last axis of (..., M) decisions, per equal-width confidence
    bin (`bin_index`): their confidence, their correctness (0/1) and their count, in one scatter for
    every leading index."""
    lead = confidence.shape[:-1]
    offsets = n_bins * torch.arange(lead.numel(), device=confidence.device).view(*lead, 1)
    index = (bin_index(confidence, n_bins) + offsets).flatten()
    values = torch.stack([confidence, correct, torch.ones_like(correct)]).double()
    sums = torch.zeros(3, lead.numel() * n_bins, dtype=torch.float64, device=confidence.device)
    sums.index_add_(1, index, values.flatten(1))
    return sums.view(3, *lead, n_bins).movedim(0, -2)


class Reliability(NamedTuple):
    """Per-bin mean confidence, accuracy (fraction correct) and count over the last axis (empty bins
    hold 0), with any leading axes (one row per seed)."""

    confidence: torch.Tensor
    accuracy: torch.Tensor
    count: torch.Tensor

    @classmethod
    def of(cls, sums: torch.Tensor) -> Reliability:
        """From `reliability_sums`."""
        confidence_sum, correct_sum, count = sums.unbind(-2)
        safe = count.clamp(min=1)
        return cls(confidence_sum / safe, correct_sum / safe, count)

    def seed(self, k: int) -> Reliability:
        return Reliability(self.confidence[k], self.accuracy[k], self.count[k])

    @property
    def ece(self) -> torch.Tensor:
        """ECE = sum_b (n_b / N) * |accuracy_b - confidence_b| (NaN without decisions)."""
        share = self.count / self.count.sum(-1, keepdim=True)
        return (share * (self.accuracy - self.confidence).abs()).sum(-1)

    @property
    def overconfidence(self) -> torch.Tensor:
        """Mean top-label confidence minus accuracy over all decisions (> 0: over-confident)."""
        return (self.count * (self.confidence - self.accuracy)).sum(-1) / self.count.sum(-1)


def reliability(probs: torch.Tensor, target: torch.Tensor, task: str, n_bins: int = N_BINS) -> Reliability:
    """The reliability bins of one set of predictions (`top_label`, `reliability_sums`)."""
    return Reliability.of(reliability_sums(*top_label(probs, target, task), n_bins))


def decision_stats(counts: torch.Tensor, task: str) -> tuple[torch.Tensor, ...]:
    """(tp, fp, tn, fn), each (K, C), from the decision counts of `StageMetrics`: (K, C, C) confusion
    counts (rows = true class) or, for multilabel data, (K, L, 2, 2) per-label [[TN, FP], [FN, TP]]."""
    if task == "multilabel":
        return counts[..., 1, 1], counts[..., 0, 1], counts[..., 0, 0], counts[..., 1, 0]
    tp = counts.diagonal(dim1=-2, dim2=-1)
    fp, fn = counts.sum(-2) - tp, counts.sum(-1) - tp
    return tp, fp, counts.sum((-2, -1)).unsqueeze(-1) - tp - fp - fn, fn


Reduction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def counted_metrics(task: str, full: bool) -> dict[str, Reduction]:
    """The metrics of the decision counts: name -> torchmetrics' own reduction of (tp, fp, tn, fn), applied
    to every seed's row at once (multidim_average="samplewise" reduces the last axis of (K, C) counts), so
    each value is the one torchmetrics' metric class gives (tests/test_metrics.py)."""
    multilabel = task == "multilabel"
    each = {"multidim_average": "samplewise", "multilabel": multilabel}

    def recall(*stats):
        return _precision_recall_reduce("recall", *stats, average="none", **each)

    # torchmetrics' multiclass default is average="macro"; every average is spelled out on purpose.
    if multilabel:
        light = {"hamming_loss": lambda *s: _hamming_distance_reduce(*s, average="micro", **each)}
        more = {"micro_f1": lambda *s: _fbeta_reduce(*s, 1.0, average="micro", **each),
                "macro_f1": lambda *s: _fbeta_reduce(*s, 1.0, average="macro", **each),
                "recall": recall,
                "specificity": lambda *s: _specificity_reduce(*s, average="none", **each)}
    else:
        light = {"accuracy": lambda *s: _accuracy_reduce(*s, average="micro", **each),
                 "balanced_accuracy": lambda *s: _accuracy_reduce(*s, average="macro", **each)}
        more = {"macro_f1": lambda *s: _fbeta_reduce(*s, 1.0, average="macro", **each), "recall": recall}
    return {**light, **more} if full else light


class Tally(torchmetrics.Metric):
    """The sums a stage's metrics are computed from, as torchmetrics states, so they are summed (counts)
    or concatenated (kept predictions, rows first) across processes in `compute`, which returns them."""

    full_state_update = False

    def __init__(self, sums: dict[str, tuple[tuple[int, ...], torch.dtype]], kept: tuple[str, ...] = ()):
        super().__init__()
        for name, (shape, dtype) in sums.items():
            self.add_state(name, torch.zeros(shape, dtype=dtype), dist_reduce_fx="sum")
        for name in kept:
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(self, **increments) -> None:
        for name, value in increments.items():
            state = getattr(self, name)
            if isinstance(state, list):
                state.append(value)
            else:
                state.add_(value)

    def compute(self) -> dict[str, torch.Tensor | None]:
        return {name: dim_zero_cat(value) if isinstance(value, torch.Tensor) or value else None
                for name, value in ((name, getattr(self, name)) for name in self._defaults)}


class StageMetrics(nn.Module):
    """One stage's metrics for `num_seeds` seeds: batches come with a leading seed axis ((K, B, C) logits,
    (K, B) or (K, B, L) targets, (K,) losses) and `compute` gives one dict per seed. `full=False` keeps the
    cheap ones (for training steps); `keep_predictions` also stores logits and targets for PR curves and
    the post-hoc adjustments (multilabel mAP keeps them anyway). `probability_map` is the loss's ("softmax"
    or "sigmoid", see `log_probabilities`).

    The predicted class of single-label data is the top logit, the top probability under either map; a
    multilabel label is predicted on where its sigmoid exceeds 0.5, as torchmetrics decides. Batches are
    held back and folded in together, once `hold_elements` logits a seed are waiting and before every
    `compute`: each fold is a fixed number of tensor operations for all seeds, whatever their number, so
    folding an epoch at once makes the metrics' cost per seed and epoch a few microseconds plus the
    arithmetic. Held batches are views of tensors the step made anyway.
    """

    def __init__(self, task: str, num_classes: int, num_seeds: int = 1, *, full: bool = True,
                 keep_predictions: bool = False, hold_elements: int = 1 << 20,
                 probability_map: str = "softmax"):
        super().__init__()
        self.task, self.num_classes, self.num_seeds, self.full = task, num_classes, num_seeds, full
        self.hold_elements = hold_elements
        self.probability_map = check_probability_map(probability_map)
        self.counted = counted_metrics(task, full)
        k, c, f64 = num_seeds, num_classes, torch.float64
        counts = (k, c, 2, 2) if task == "multilabel" else (k, c, c)
        sums = {"loss": ((k,), f64), "rows": ((), torch.long), "counts": (counts, torch.long)}
        if full:
            sums.update(nll=((k,), f64), brier=((k,), f64), bins=((k, 3, N_BINS), f64))
            if task == "multilabel":
                sums["exact"] = ((k,), torch.long)
        self.keeps = keep_predictions or (full and task == "multilabel")
        self.tally = Tally(sums, ("logits", "target") if self.keeps else ())
        labels = (num_classes,) if task == "multilabel" else ()
        self._shapes = {name: shape for name, (shape, _) in sums.items()} | {
            "logits": (-1, k, c), "target": (-1, k, *labels)}
        self._held: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._held_elements = 0

    def update(self, logits: torch.Tensor, target: torch.Tensor, losses: torch.Tensor) -> None:
        """Adds a batch: its (detached) logits, targets and each seed's value of the batch-mean loss."""
        if logits.dim() != 3 or logits.shape[0] != self.num_seeds:
            raise ValueError(f"expected logits of shape ({self.num_seeds}, batch, classes), got "
                             f"{tuple(logits.shape)}")
        self._held.append((logits, target, losses))
        self._held_elements += logits.numel()
        if self._held_elements >= self.hold_elements * self.num_seeds:
            self._fold()

    def _fold(self) -> None:
        """Adds every held batch to the tally, all seeds at once."""
        if not self._held:
            return
        logits, target, losses = zip(*self._held, strict=True)
        self._held, self._held_elements = [], 0
        sizes = torch.tensor([t.shape[1] for t in target], dtype=torch.float64, device=losses[0].device)
        logits, target = torch.cat(logits, dim=1), torch.cat(target, dim=1)
        k, n, c = logits.shape
        seeds = torch.arange(k, device=logits.device).view(k, 1, *(1,) * (target.dim() - 2))
        sums = {"loss": (torch.stack(losses, dim=1).double() * sizes).sum(-1), "rows": n}
        if self.task == "multilabel":
            probs = probabilities(logits, self.task)
            decided, truth = (probs > 0.5).long(), target.long()
            labels = torch.arange(c, device=logits.device)
            cells = (((seeds * c + labels) * 2 + truth) * 2 + decided).flatten()
            if self.full:
                sums["exact"] = (decided == truth).all(-1).sum(-1)
            log_q = None
        else:
            cells = ((seeds * c + target) * c + logits.argmax(-1)).flatten()
            log_q = log_probabilities(logits, self.probability_map) if self.full else None
            probs = log_q.exp() if self.full else None
        sums["counts"] = torch.bincount(cells, minlength=self.tally.counts.numel()).view_as(self.tally.counts)
        if self.full:
            task, probability_map = self.task, self.probability_map
            sums["nll"] = nll_sum(logits, target, task, probability_map, log_q=log_q)[0].double()
            sums["brier"] = brier_sum(logits, target, task, probability_map, probs=probs)[0].double()
            sums["bins"] = reliability_sums(*top_label(probs, target, self.task))
        if self.keeps:  # rows first, as torchmetrics concatenates across processes
            sums["logits"], sums["target"] = logits.movedim(1, 0), target.movedim(1, 0)
        self.tally.update(**sums)

    def _tallied(self) -> dict[str, torch.Tensor | None]:
        """The tally over every batch so far (and every process): a collective under DDP."""
        self._fold()
        # torchmetrics squeezes one-element results (a seed axis of one): every tally keeps its shape here.
        return {name: None if value is None else value.reshape(self._shapes[name])
                for name, value in self.tally.compute().items()}

    def compute(self) -> list[dict[str, float]]:
        """Each seed's name -> value; `recall` becomes `recall_class_<c>`, and for multilabel data
        balanced_accuracy = mean_l (recall_l + specificity_l) / 2."""
        return self._values(self._tallied())

    def _values(self, tally: dict[str, torch.Tensor | None]) -> list[dict[str, float]]:
        stats = decision_stats(tally["counts"], self.task)
        values = {"loss": tally["loss"] / tally["rows"]}
        values.update({name: reduce(*stats) for name, reduce in self.counted.items()})
        if self.full:
            per_row = tally["rows"] * (self.num_classes if self.task == "multilabel" else 1)
            if self.task == "multilabel":
                # Average precision ranks every score; it stays per seed.
                values["map"] = torch.stack([
                    tmf.multilabel_average_precision(probs, target.long(), self.num_classes, average="macro")
                    for probs, target in zip(*self.kept_predictions(), strict=True)])
                values["exact_match"] = tally["exact"] / tally["rows"]
            values["nll"], values["brier"] = tally["nll"] / per_row, tally["brier"] / per_row
            bins = Reliability.of(tally["bins"])
            values["ece"], values["overconfidence"] = bins.ece, bins.overconfidence
        if "specificity" in values:
            values["balanced_accuracy"] = ((values["recall"] + values.pop("specificity")) / 2).mean(-1)
        columns = {name: value.tolist() for name, value in values.items()}
        seeds = []
        for k in range(self.num_seeds):
            out = {}
            for name, column in columns.items():
                if name == "recall":
                    out.update({f"recall_class_{c}": float(v) for c, v in enumerate(column[k])})
                else:
                    out[name] = float(column[k])
            seeds.append(out)
        return seeds

    def confusion_matrix(self) -> torch.Tensor:
        """(K, C, C) counts, rows = true class; multilabel: (K, L, 2, 2) per label, [[TN, FP], [FN, TP]]."""
        return self._tallied()["counts"]

    def reliability(self) -> Reliability:
        """Each seed's reliability bins (`full=True` only)."""
        return Reliability.of(self._tallied()["bins"])

    def kept_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every logit row and target of the stage so far, (K, N, C) and (K, N[, L]) (`keep_predictions`)."""
        tally = self._tallied()
        return tally["logits"].movedim(0, 1), tally["target"].movedim(0, 1)

    def kept_predictions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every probability row (the model's probability map) and target of the stage so far."""
        logits, target = self.kept_logits()
        return probabilities(logits, self.task, self.probability_map), target

    def reset(self) -> None:
        self._held, self._held_elements = [], 0
        self.tally.reset()


# --- post-hoc adjustments (fitted or applied after training; docs/metrics.md) ---------------------------

def calibration_scores(logits: torch.Tensor, target: torch.Tensor, task: str,
                       probability_map: str = "softmax") -> dict[str, float]:
    """ECE, overconfidence (mean confidence - accuracy), NLL and Brier of one set of predictions,
    by the same definitions as `StageMetrics`."""
    bins = reliability(probabilities(logits, task, probability_map), target, task)
    scores = {"ece": float(bins.ece), "overconfidence": float(bins.overconfidence)}
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
    return {**values, "prior_corrected_ece": float(reliability(log_q.exp(), target, task).ece)}


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
