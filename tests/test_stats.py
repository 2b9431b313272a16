"""The report's statistics: exact test, paired t, Holm, clipped intervals, and the comparison function's
error rates in simulated sweeps (null: no false claims beyond 5% per sweep; a planted effect is found)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from xentlab.lab.report.compare import KEY_METRICS, build_groups, compare, verdict_lines
from xentlab.lab.report.rank import across_contexts, critical_difference, probability_best, rankings, ranks
from xentlab.lab.report.stats import (
    MIN_SEEDS,
    decision_interval,
    holm,
    paired_test,
    seeds_needed,
    sign_flip_p,
    summarize,
    tost_p,
)
from xentlab.lab.report.sweep import Run


def test_holm_matches_hand_computation():
    # Sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → running max 0.06.
    adjusted = holm([0.01, 0.04, 0.03, 0.005, math.nan])
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(adjusted[4])  # NaN is not a test and does not count in m
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_sign_flip_is_scipys_exact_permutation_test():
    d = np.array([0.3, -0.1, 0.25, 0.4, 0.05, -0.2, 0.15])
    expected = scipy_stats.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=np.inf,
                                            alternative="two-sided").pvalue
    assert sign_flip_p(d) == pytest.approx(expected)
    # Ties with the observed sum count: a constant difference reaches only 2 / 2^n.
    assert sign_flip_p([0.091] * 3) == pytest.approx(0.25)
    assert sign_flip_p([0.091] * 5) == pytest.approx(2 / 32)
    assert sign_flip_p([0.0, 0.0, 0.0]) == 1.0


def test_paired_test_uses_t_unless_the_differences_are_degenerate():
    d = np.array([0.12, 0.18, 0.15, 0.22, 0.09, 0.17, 0.14])
    result = paired_test(d, (-1.0, 1.0))
    assert result.test == "paired t"
    assert result.p == pytest.approx(scipy_stats.ttest_1samp(d, 0.0).pvalue)
    half = scipy_stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    assert (result.low, result.high) == pytest.approx((d.mean() - half, d.mean() + half))
    assert result.positive == 7 and result.negative == 0
    # A constant difference has no variance for a t: the exact test, whose floor at n = 3 is 0.25.
    constant = paired_test([1 / 11] * 3)
    assert constant.test == "sign-flip" and constant.p == pytest.approx(0.25)
    # One seed off a constant step (a discrete metric): two distinct |d|, the exact test, 2 * 1/32.
    step = paired_test([1 / 11] * 4 + [2 / 11])
    assert step.test == "sign-flip" and step.p == pytest.approx(2 / 32)


def test_group_interval_stays_in_the_metric_range():
    summary = summarize([0.0, 0.0, 0.3], (0.0, 1.0))
    half = scipy_stats.t.ppf(0.975, 2) * np.std([0, 0, 0.3], ddof=1) / math.sqrt(3)
    assert summary.mean == pytest.approx(0.1) and summary.low == 0.0
    assert summary.high == pytest.approx(0.1 + half)
    assert summarize([0.0, 0.0, 0.0], (0.0, 1.0)).text() == "0.000 (all 3 equal)"
    assert summarize([0.4]).text() == "0.400 (1 run)"


def test_seeds_needed_grows_as_the_effect_shrinks():
    big = seeds_needed(paired_test([0.2, 0.25, 0.15]), family=15)
    small = seeds_needed(paired_test([0.02, 0.1, -0.04]), family=15)
    assert MIN_SEEDS <= big < small
    # A constant difference: the exact test needs 2 / 2^n <= 0.05 / 15, i.e. n >= 10.
    assert seeds_needed(paired_test([0.091] * 3), family=15) == 10
    assert seeds_needed(paired_test([0.0, 0.0, 0.0]), family=15) is None


LOSSES = ("ce", "weighted_ce", "focal")
RATIOS = (1, 10, 100)
METRICS = [m for m in KEY_METRICS if m.key != "test/minority_recall"] + [
    m for m in KEY_METRICS if m.key == "test/minority_recall"]


def simulated_sweep(rng: np.random.Generator, n_seeds: int, effect: dict | None = None) -> list[Run]:
    """Runs of an imbalance_sweep-shaped grid (3 losses × 3 ratios × n seeds, 5 metrics), every loss drawn
    from the same distribution: a per-seed data effect shared by all losses plus each run's own noise.
    Minority recall is discrete (hits out of 40 test samples). `effect` adds shifts by
    (loss, ratio, metric)."""
    effect = effect or {}
    runs = []
    for ratio in RATIOS:
        seed_level = rng.normal(0, 0.04, size=(n_seeds, len(METRICS)))
        p_minority = rng.uniform(0.2, 0.6, size=n_seeds)
        for loss in LOSSES:
            noise = rng.normal(0, 0.02, size=(n_seeds, len(METRICS)))
            shift = np.array([effect.get((loss, ratio, m.key), 0.0) for m in METRICS])
            values = 0.5 + seed_level + noise + shift
            p = np.clip(p_minority + effect.get((loss, ratio, "test/minority_recall"), 0), 0, 1)
            values[:, -1] = rng.binomial(40, p) / 40
            for seed in range(n_seeds):
                overrides = (f"loss={loss}", f"data.imbalance_ratio={ratio}", f"seed={seed}")
                config = {"seed": seed, "loss": {"name": loss}, "data": {"imbalance_ratio": 10}}
                metrics = {m.key: float(v) for m, v in zip(METRICS, values[seed], strict=True)}
                runs.append(Run(Path(f"{loss}-{ratio}-{seed}"), "completed", metrics, config, overrides))
    return runs


def claims(runs: list[Run]):
    groups = build_groups(runs)
    return compare(groups, METRICS, {"loss": "ce"})


@pytest.mark.parametrize(("n_seeds", "sweeps"), [(10, 300), (5, 100)])
def test_null_sweeps_make_a_false_claim_in_at_most_5_percent(n_seeds, sweeps):
    rng = np.random.default_rng(12 + n_seeds)
    any_false, any_raw = 0, 0
    for _ in range(sweeps):
        found = claims(simulated_sweep(rng, n_seeds))
        assert len(found.items) == 2 * 3 * 5  # losses × ratios × metrics against ce
        any_false += any(c.significant for c in found.items)
        any_raw += any(c.paired.p < 0.05 for c in found.items)
    # Holm holds the family-wise rate at 5%: 30 nearly independent exact tests put the true rate just
    # under it (0.047 at n = 5, 0.050 at n = 10 in 20 000 simulated sweeps), so the check is that the
    # share of sweeps with any false claim shows no evidence of exceeding 5% (one-sided exact binomial
    # test). Unadjusted, most sweeps would hold a "win": that share fails the same check by far.
    assert scipy_stats.binomtest(any_false, sweeps, 0.05, alternative="greater").pvalue > 0.01, any_false
    assert scipy_stats.binomtest(any_raw, sweeps, 0.05, alternative="greater").pvalue < 1e-6


def test_a_realistic_effect_at_ten_seeds_is_found():
    # The measured effect at ratio 100: class-weighted CE +0.20 minority recall over CE.
    rng = np.random.default_rng(5)
    found = claims(simulated_sweep(rng, 10, {("weighted_ce", 100, "test/minority_recall"): 0.2}))
    hit = next(c for c in found.items if c.group.label == "loss=weighted_ce" and c.context ==
               "data.imbalance_ratio=100" and c.metric.key == "test/minority_recall")
    assert hit.significant and hit.better and hit.paired.diff == pytest.approx(0.2, abs=0.08)
    assert [c for c in found.items if c.significant] == [hit]  # and nothing else in this seeded sweep
    line = next(v for v in verdict_lines(found) if v.startswith("data.imbalance_ratio=100, minority recall"))
    assert "loss=weighted_ce better than loss=ce by +0." in line and "/10 seeds, adjusted p = " in line


def test_a_constant_difference_on_three_seeds_makes_no_claim():
    runs = []
    for loss, recall in (("ce", 0.0), ("weighted_ce", 1 / 11)):
        for seed in range(3):
            runs.append(Run(Path(f"{loss}{seed}"), "completed", {"test/minority_recall": recall},
                            {"seed": seed, "loss": {"name": loss}}, (f"loss={loss}", f"seed={seed}")))
    found = claims(runs)
    (only,) = found.items
    assert only.paired.diff == pytest.approx(1 / 11) and only.paired.p == pytest.approx(0.25)
    assert not only.significant and only.needed is not None and only.needed >= MIN_SEEDS
    (line,) = verdict_lines(found)
    assert "no claim with fewer than 5 matched seeds" in line and "better than" not in line


# --- equivalence, decision intervals, post-hoc baselines -------------------------------------------------

def two_losses(rng: np.random.Generator, gap: float, n_seeds: int = 10, noise: float = 0.002) -> list[Run]:
    """ce and focal on n seeds: a shared per-seed level, focal `gap` higher on balanced accuracy."""
    runs = []
    for seed in range(n_seeds):
        level = 0.7 + 0.03 * rng.normal()
        for loss, shift in (("ce", 0.0), ("focal", gap)):
            value = level + shift + noise * rng.normal()
            runs.append(Run(Path(f"{loss}{seed}"), "completed", {"test/balanced_accuracy": value},
                            {"seed": seed, "loss": {"name": loss}}, (f"loss={loss}", f"seed={seed}")))
    return runs


BALANCED_ACCURACY = next(m for m in KEY_METRICS if m.key == "test/balanced_accuracy")


@pytest.mark.parametrize(("gap", "decision"), [(0.001, "equivalent"), (0.05, "better"), (-0.05, "worse")])
def test_planted_effects_are_called_equivalent_better_or_worse(gap, decision):
    found = compare(build_groups(two_losses(np.random.default_rng(1), gap)), [BALANCED_ACCURACY],
                    {"loss": "ce"}, {"balanced_accuracy": 0.01})
    (only,) = found.items
    assert only.decision == decision and only.delta == 0.01
    assert only.equivalent == (decision == "equivalent")
    low, high = only.interval
    if decision == "equivalent":  # the simultaneous interval shows it: inside ±δ
        assert -0.01 < low < high < 0.01
        (line,) = verdict_lines(found)
        assert line.startswith("balanced acc ↑: equivalent to loss=ce (within ±0.01) at n = 10: "
                               "loss=focal +0.0")
    else:
        assert (low > 0) == (gap > 0) and (high < 0) == (gap < 0)


def test_an_unclear_difference_is_inconclusive_with_the_seeds_it_needs():
    found = compare(build_groups(two_losses(np.random.default_rng(2), 0.008, n_seeds=6, noise=0.01)),
                    [BALANCED_ACCURACY], {"loss": "ce"})
    (only,) = found.items
    assert only.decision == "inconclusive" and only.needed is not None and only.needed > 6
    (line,) = verdict_lines(found)
    assert "inconclusive against loss=ce (within ±0.01) at n = 6: loss=focal" in line
    assert f"~{only.needed} seeds would decide" in line and "no detectable difference" not in line


def test_tost_is_two_one_sided_t_tests():
    d = np.array([0.002, -0.001, 0.004, 0.0, 0.003, 0.001])
    lower = scipy_stats.ttest_1samp(d, -0.01, alternative="greater").pvalue
    upper = scipy_stats.ttest_1samp(d, 0.01, alternative="less").pvalue
    assert tost_p(d, 0.01, "paired t") == pytest.approx(max(lower, upper), rel=1e-10)


def test_no_row_says_no_difference_while_its_decision_interval_excludes_zero():
    # The simultaneous interval at α/m inverts each comparison's own test, so excluding 0 implies
    # p < α/m, hence a Holm-adjusted p < α: never "inconclusive" with an interval that excludes 0.
    rng = np.random.default_rng(3)
    effect = {("weighted_ce", 100, "test/balanced_accuracy"): 0.03, ("focal", 10, "test/ece"): -0.02}
    for _ in range(20):
        for c in claims(simulated_sweep(rng, 8, effect)).items:
            low, high = c.interval
            if low > 0 or high < 0:
                assert c.significant, (c.paired, c.interval, c.p_adjusted)


def test_the_sign_flip_decision_interval_inverts_the_sign_flip_test():
    level, d = 0.05, np.array([0.0, 0.1, 0.1, 0.1, 0.2, 0.1, 0.1])
    low, high = decision_interval(d, level, "sign-flip", (-1.0, 1.0))
    accepted = [mu for mu in np.linspace(-1, 1, 4001) if sign_flip_p(d - mu) >= level]
    assert low == pytest.approx(min(accepted), abs=1e-3) and high == pytest.approx(max(accepted), abs=1e-3)
    # A constant difference: 2/2^6 = 0.031 < 0.05 rejects every other shift; 2/2^4 = 0.125 rejects none.
    assert decision_interval([0.091] * 6, level, "sign-flip", (-1.0, 1.0)) == pytest.approx((0.091, 0.091))
    assert decision_interval([0.091] * 4, level, "sign-flip", (-1.0, 1.0)) == (-1.0, 1.0)


def long_tailed_runs(rng: np.random.Generator, n_seeds: int = 8) -> list[Run]:
    """ce (with its post-hoc figures) and weighted_ce trained long-tailed, tested on a balanced split."""
    runs = []
    for seed in range(n_seeds):
        level = 0.03 * rng.normal()
        rows = {"ce": {"test/balanced_accuracy": 0.60 + level + 0.005 * rng.normal(),
                       "test/la_balanced_accuracy": 0.66 + level + 0.005 * rng.normal(),
                       "test/ece": 0.23 + 0.01 * rng.normal(), "test/ts_ece": 0.20 + 0.01 * rng.normal(),
                       "test/prior_corrected_ece": 0.09 + 0.005 * rng.normal()},
                "weighted_ce": {"test/balanced_accuracy": 0.63 + level + 0.005 * rng.normal(),
                                "test/ece": 0.12 + 0.01 * rng.normal(),
                                "test/prior_corrected_ece": 0.09 + 0.005 * rng.normal()}}
        for loss, metrics in rows.items():
            config = {"seed": seed, "loss": {"name": loss}, "data": {"imbalance_ratio": 100,
                                                                      "eval_split": "balanced"}}
            overrides = (f"loss={loss}", f"seed={seed}")
            runs.append(Run(Path(f"{loss}{seed}"), "completed", metrics, config, overrides))
    return runs


def test_post_hoc_baselines_are_rows_built_from_the_logged_post_hoc_metrics():
    runs = long_tailed_runs(np.random.default_rng(4))
    groups = build_groups(runs, {"loss": "ce"})
    by_label = {g.label: g for g in groups}
    assert list(by_label) == ["loss=ce", "loss=ce+posthoc_la", "loss=ce+ts", "loss=weighted_ce"]
    ce = [r for r in runs if r.config["loss"]["name"] == "ce"]
    la, ts = by_label["loss=ce+posthoc_la"], by_label["loss=ce+ts"]
    assert la.stats["test/balanced_accuracy"].mean == pytest.approx(
        np.mean([r.metrics["test/la_balanced_accuracy"] for r in ce]))
    assert ts.stats["test/ece"].mean == pytest.approx(np.mean([r.metrics["test/ts_ece"] for r in ce]))
    assert set(la.stats) == {"test/balanced_accuracy"} and set(ts.stats) == {"test/ece"}

    found = compare(groups, [m for m in KEY_METRICS if "ece" in m.key or "balanced" in m.key], {"loss": "ce"})
    wce_vs_la = next(c for c in found.items if c.group.label == "loss=weighted_ce"
                     and c.baseline is la and c.metric.key == "test/balanced_accuracy")
    wce = {r.config["seed"]: r.metrics["test/balanced_accuracy"] for r in runs
           if r.config["loss"]["name"] != "ce"}
    expected = np.mean([wce[r.config["seed"]] - r.metrics["test/la_balanced_accuracy"] for r in ce])
    assert wce_vs_la.paired.diff == pytest.approx(expected)
    # Imbalanced training, balanced test: the headline baseline is the stronger of CE and CE + post-hoc
    # adjustment, so weighted CE, better than plain CE, is reported worse than what CE gets for free.
    assert wce_vs_la.headline and wce_vs_la.decision == "worse"
    plain = next(c for c in found.items if c.group.label == "loss=weighted_ce"
                 and c.baseline.label == "loss=ce" and c.metric.key == "test/balanced_accuracy")
    assert plain.better and not plain.headline
    lines = verdict_lines(found)
    assert lines[0].startswith("balanced acc ↑ (against loss=ce+posthoc_la, the stronger of loss=ce (0.")
    assert "loss=weighted_ce worse than loss=ce+posthoc_la by -0.0" in lines[0]
    assert lines[1].startswith("balanced acc ↑ against loss=ce: loss=weighted_ce better than loss=ce")
    # Calibration under the prior shift: judged by the prior-corrected ECE, where CE and weighted CE are
    # alike; raw ECE (the shift) is not compared.
    keys = {c.metric.key for c in found.items}
    assert "test/ece" not in keys and "test/prior_corrected_ece" in keys
    pc = next(c for c in found.items if c.metric.key == "test/prior_corrected_ece")
    assert pc.decision in ("equivalent", "inconclusive")


def test_a_post_hoc_baseline_can_be_chosen():
    runs = long_tailed_runs(np.random.default_rng(5))
    baseline = {"loss": "ce+posthoc_la"}
    found = compare(build_groups(runs, baseline), [BALANCED_ACCURACY], baseline)
    lead = [c for c in found.items if c.headline]
    assert {c.baseline.label for c in lead} == {"loss=ce+posthoc_la"}
    assert {c.group.label for c in lead} == {"loss=ce", "loss=weighted_ce"}


# --- rankings, aggregation over contexts, critical differences --------------------------------------------

def context_sweep(means: dict[str, list[float]], n_seeds: int = 3, metric: str = "test/balanced_accuracy"):
    """Runs over contexts `data=<i>`: loss L in context i scores means[L][i] on every seed (plus a tiny
    seed-specific wobble shared by all losses, so differences are exact)."""
    runs = []
    for loss, values in means.items():
        for i, value in enumerate(values):
            for seed in range(n_seeds):
                runs.append(Run(Path(f"{loss}-{i}-{seed}"), "completed", {metric: value + 0.001 * seed},
                                {"seed": seed, "loss": {"name": loss}},
                                (f"loss={loss}", f"data=d{i}", f"seed={seed}")))
    return runs


def test_critical_difference_ranks_match_a_hand_computation():
    means = {"ce": [0.70, 0.60, 0.80], "focal": [0.72, 0.58, 0.80], "weighted_ce": [0.75, 0.65, 0.79]}
    groups = build_groups(context_sweep(means), {"loss": "ce"})
    cd = critical_difference(groups, BALANCED_ACCURACY)
    # Per context, 1 = best: d0 wce 1, focal 2, ce 3; d1 wce 1, ce 2, focal 3; d2 ce and focal tie for
    # 1-2 (1.5 each), wce 3. Averages: ce (3 + 2 + 1.5) / 3, focal (2 + 3 + 1.5) / 3, wce (1 + 1 + 3) / 3.
    assert cd.labels == ("loss=ce", "loss=focal", "loss=weighted_ce") and cd.contexts == 3
    assert cd.average_rank == pytest.approx((6.5 / 3, 6.5 / 3, 5 / 3))
    assert cd.different == frozenset()  # three contexts cannot separate anything
    assert cd.cliques() == [(0, 2)]


def test_wilcoxon_over_contexts_with_holm_matches_scipy():
    rng = np.random.default_rng(6)
    ce = rng.uniform(0.5, 0.8, 8)
    means = {"ce": list(ce), "focal": list(ce + rng.normal(0, 0.01, 8)),
             "weighted_ce": list(ce + 0.03 + rng.normal(0, 0.01, 8))}
    groups = build_groups(context_sweep(means), {"loss": "ce"})
    compare(groups, [BALANCED_ACCURACY], {"loss": "ce"})  # marks the baselines
    rows = {r.loss: r for r in across_contexts(groups, [BALANCED_ACCURACY])}
    expected = {}
    for loss in ("focal", "weighted_ce"):
        diffs = np.array(means[loss]) - ce
        assert rows[f"loss={loss}"].diffs == pytest.approx(tuple(diffs))
        expected[loss] = scipy_stats.wilcoxon(diffs).pvalue
        assert rows[f"loss={loss}"].p == pytest.approx(expected[loss])
    ordered = sorted(expected.values())
    holm_by_hand = {loss: max(min(1, (2 - ordered.index(p)) * p) for p in ordered[:ordered.index(v) + 1])
                    for loss, v in expected.items()}
    for loss, value in holm_by_hand.items():
        assert rows[f"loss={loss}"].p_adjusted == pytest.approx(value)
    assert rows["loss=weighted_ce"].decision == "better"  # 8/8 contexts: exact p = 2/256, adjusted 0.016
    assert rows["loss=focal"].decision == "inconclusive"


def test_mean_ranks_and_the_probability_of_being_best_over_seeds():
    values = np.array([[0.7, 0.6, 0.5], [0.8, 0.6, 0.7], [0.7, 0.7, 0.6]])  # seeds × losses
    assert ranks(values, True).mean(axis=0) == pytest.approx([(1 + 1 + 1.5) / 3, (2 + 3 + 1.5) / 3, 8 / 3])
    best = probability_best(values, True)
    assert best.sum() == pytest.approx(1.0) and best[0] > 0.95  # the best mean on nearly every resample
    found = rankings(build_groups(two_losses(np.random.default_rng(7), 0.05)), [BALANCED_ACCURACY])
    (only,) = found
    assert only.labels == ("loss=ce", "loss=focal") and only.mean_rank == pytest.approx((2.0, 1.0))
    assert only.p_best == pytest.approx((0.0, 1.0))
