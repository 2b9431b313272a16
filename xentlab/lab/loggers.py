"""Where a run's metrics go: TensorBoard always (the lab's figures, HParams view and `xentlab board` read its
event files), and, by `logger=csv|wandb|mlflow`, one of Lightning's other loggers beside it, writing into
the run's folder without any account or server: CSV files, an offline Weights & Biases run, a local
MLflow file store. Each gets every logged metric, the run's settings as hyperparameters, and its record
(`metrics.json`: status, final metrics) when the run ends.
"""

from __future__ import annotations

import os
from pathlib import Path

from pytorch_lightning.loggers import Logger

from xentlab.lab.module import BoardLogger

LOGGERS = ("tensorboard", "csv", "wandb", "mlflow")
# Lightning's loggers that need a package of their own name, brought by xentlab's extra of that name.
NEED_PACKAGE = ("wandb", "mlflow")


class RunLogger(BoardLogger):
    """The lab's TensorBoard logger, passing every metric, hyperparameter and the end of the run on to
    `extras` (other Lightning loggers) as well: one logger object for the module to log to."""

    def __init__(self, *args, extras: list[Logger] | tuple = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.extras = list(extras)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        for extra in self.extras:
            extra.log_metrics(dict(metrics), step)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        super().log_hyperparams(params, *args, **kwargs)
        for extra in self.extras:
            extra.log_hyperparams(params)

    def save(self) -> None:
        super().save()
        for extra in self.extras:
            extra.save()

    def finalize(self, status: str) -> None:
        super().finalize(status)
        for extra in self.extras:
            extra.finalize(status)


def build_logger(settings: dict, run_dir: str | Path, params: dict | None = None) -> RunLogger:
    """The run's logger: TensorBoard into `run_dir`, plus the `logger.name` logger (one of LOGGERS) with
    `settings`' other keys, given `params` (the run's flat settings) as its hyperparameters."""
    settings = dict(settings)
    name = settings.pop("name", "tensorboard")
    check_logger(name)
    run_dir = Path(run_dir)
    if name == "tensorboard":
        return RunLogger(save_dir=str(run_dir), name="", version="", **settings)
    extra = _extra_logger(name, settings, run_dir, params or {}, run_dir.name)
    if name != "wandb":  # W&B got them as its run's config when it started
        extra.log_hyperparams(params or {})
    return RunLogger(save_dir=str(run_dir), name="", version="", default_hp_metric=False, extras=[extra])


def check_logger(name: str) -> None:
    """Refuse an unknown logger, or one whose package is missing, naming the extra to install."""
    import importlib.util

    if name not in LOGGERS:
        raise ValueError(f"logger={name} is not a logger; choose one of {', '.join(LOGGERS)}")
    if name in NEED_PACKAGE and importlib.util.find_spec(name) is None:
        raise ImportError(f"logger={name} needs the optional extra: pip install 'xentlab[{name}]'")


def _extra_logger(name: str, settings: dict, run_dir: Path, params: dict, run_name: str) -> Logger:
    if name == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="", version="", **settings)
    if name == "mlflow":
        from pytorch_lightning.loggers import MLFlowLogger

        uri = settings.pop("tracking_uri", None) or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store only on request; a folder per run needs no database server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return MLFlowLogger(tracking_uri=uri, run_name=run_name, **settings)
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    offline = settings.pop("offline", True)
    # A run of its own for every seed of a batch ("create_new"): WandbLogger alone would reuse the
    # process's current run.
    run = wandb.init(dir=str(run_dir), name=run_name, config=params, reinit="create_new",
                     mode="offline" if offline else "online", settings=wandb.Settings(quiet=True), **settings)
    return WandbLogger(experiment=run, save_dir=str(run_dir))


def send_record(logger: Logger | None, record: dict, record_file: Path | None = None) -> None:
    """The run's record (`metrics.json`) to every extra logger of a `RunLogger`: its status and final
    metrics, and the file itself where the logger keeps files (W&B, MLflow). Called once, when the run has
    ended; TensorBoard alone needs nothing (the board reads the record beside its event files)."""
    for extra in getattr(logger, "extras", ()):
        _send_record(extra, record, record_file)


def _send_record(logger: Logger, record: dict, record_file: Path | None) -> None:
    """A run's record to one logger: W&B gets its status and final metrics as the run's summary and the
    file, then the run is finished; MLflow its status as a tag and the file as an artifact; CSV its status
    in hparams.yaml (the final metrics are already its last rows)."""
    final = {k: v for k, v in record.get("metrics", {}).items() if isinstance(v, (int, float))}
    status = record.get("status", "unknown")
    name = type(logger).__name__
    if name == "WandbLogger":
        run = logger.experiment
        run.summary.update({"status": status, **final})
        if record_file is not None and Path(record_file).is_file():
            run.save(str(record_file), base_path=str(Path(record_file).parent), policy="now")
        run.finish(exit_code=0 if status == "completed" else 1)
    elif name == "MLFlowLogger":
        logger.experiment.set_tag(logger.run_id, "status", status)
        if record_file is not None and Path(record_file).is_file():
            logger.experiment.log_artifact(logger.run_id, str(record_file))
        logger.finalize("success" if status == "completed" else "failed")
    else:
        logger.log_hyperparams({"status": status})
        logger.save()
