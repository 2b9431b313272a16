"""Tuned comparisons (`tune=grid` on any run or sweep; `experiment=tuned`): each loss gets its own learning
rate, and its own parameter where it has one, chosen on the validation split before its seeds train.

With one recipe for every loss, a loss that needs another learning rate loses by construction. So before
a job trains its seeds, every candidate of its grid (`tune.grid`, e.g. the learning rates, times
`tune.loss_grid[<loss>]`, e.g. focal's gamma) trains on *tuning seeds* (`seed + tune.seed_offset`, ...,
`tune.seeds` of them as one seed batch), disjoint from the job's own seeds, and is scored by the mean of
`objective` (a `val/` metric; under `checkpoint=best` its best epoch's value) over them. The best candidate
is then trained and tested on the job's own, fresh seeds: the test split never takes part in the choice,
and the seeds that chose a setting are not the seeds that report it. Only the fresh seeds are written as
runs (the candidates train in a temporary folder); `<job dir>/tuning.json` keeps every candidate's scores,
and the runs' config carries the outcome (`tune.result`: the chosen overrides, the objective, the score,
the candidates and tuning seeds), which the report shows per loss. A resumed job (`ckpt_path=last`) reuses
the choice in its tuning.json when the grid, objective and tuning seeds are the same.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from xentlab.lab.atomic import atomic_write
from xentlab.lab.report.options import higher_is_better
from xentlab.lab.runs import check_fresh_start
from xentlab.lab.validation import ConfigError, grid_of

TUNING_FILE = "tuning.json"


def candidates(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, in the grid's order."""
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def with_setting(cfg: DictConfig, setting: dict) -> DictConfig:
    """A copy of `cfg` with each `key: value` of `setting` set."""
    chosen = copy.deepcopy(cfg)
    with open_dict(chosen):
        for key, value in setting.items():
            OmegaConf.update(chosen, key, value, merge=False)
    return chosen


def overrides_of(setting: dict) -> list[str]:
    return [f"{key}={value}" for key, value in setting.items()]


def tuning_seeds(cfg: DictConfig) -> list[int]:
    start = cfg.seed + int(cfg.tune.seed_offset)
    return list(range(start, start + int(cfg.tune.seeds)))


def tune(cfg: DictConfig, output_dir: Path, *, threads: int | None = None, say=print) -> DictConfig:
    """`cfg` with the grid's best candidate set and `tune.result` recorded (see the module docstring); `cfg`
    itself when there is no grid. Writes `<output_dir>/tuning.json`."""
    from xentlab.lab.run import train  # torch and Lightning: only when there is a grid to tune
    from xentlab.lab.sweep import sweep_value

    grid = grid_of(cfg)
    if not grid:
        return cfg
    check_fresh_start(cfg, output_dir)  # train's own check, made before the candidates train
    seeds, objective = tuning_seeds(cfg), str(cfg.objective)
    plan = {"grid": grid, "objective": objective, "tuning_seeds": seeds,
            "checkpoint": cfg.get("checkpoint", "last")}
    done = previous_tuning(output_dir / TUNING_FILE, plan)
    if done is None:
        trials = []
        for setting in candidates(grid):
            trial = with_setting(cfg, setting)
            with open_dict(trial):
                trial.seed, trial.seeds, trial.ckpt_path = seeds[0], len(seeds), None
                trial.tune.grid, trial.tune.loss_grid = {}, {}
            with tempfile.TemporaryDirectory(prefix="xentlab-tuning-") as folder:
                records = train(trial, folder, threads=threads)
            scores = [sweep_value(r, objective, must_be_finite=False) if r["status"] == "completed"
                      else math.nan for r in records]
            finite = [s for s in scores if math.isfinite(s)]
            trials.append({"setting": setting, "scores": scores,
                           "mean": sum(finite) / len(finite) if len(finite) == len(scores) else None})
        done = {**plan, "trials": trials, "chosen": best_trial(trials, objective)}
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(output_dir / TUNING_FILE, json.dumps(done, indent=2) + "\n")
    chosen = done["trials"][done["chosen"]]
    say(f"[xentlab] tuned {', '.join(overrides_of(chosen['setting']))}: {objective} {chosen['mean']:.3f} "
        f"over tuning seeds {seeds[0]}-{seeds[-1]}, best of {len(done['trials'])} candidates "
        f"({output_dir / TUNING_FILE})", flush=True)
    result = with_setting(cfg, chosen["setting"])
    with open_dict(result):
        result.tune.result = {"chosen": overrides_of(chosen["setting"]), "objective": objective,
                              "score": chosen["mean"], "candidates": len(done["trials"]),
                              "tuning_seeds": seeds}
    return result


def best_trial(trials: list[dict], objective: str) -> int:
    """Index of the candidate with the best mean objective (the first on a tie); a candidate with a failed
    or non-finite tuning seed is out. ConfigError when every candidate is out."""
    kept = [i for i, t in enumerate(trials) if t["mean"] is not None]
    if not kept:
        raise ConfigError(f"tune: every candidate failed or gave a non-finite {objective} on a tuning seed; "
                          f"see the candidates' scores: {[t['scores'] for t in trials]}")
    sign = 1.0 if higher_is_better(objective) else -1.0
    return max(kept, key=lambda i: (sign * trials[i]["mean"], -i))


def previous_tuning(path: Path, plan: dict) -> dict | None:
    """The tuning a resumed job already did: its tuning.json when it was made for the same plan."""
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = isinstance(done, dict) and all(done.get(k) == v for k, v in plan.items())
    return done if same and isinstance(done.get("chosen"), int) else None
