"""The Hydra entry point: config → data, loss, model → Lightning fit + test → metrics.json.

Run `xentlab-train --help` for the config groups, or `xentlab-train -m loss=ce,focal seed=0,1,2` for a sweep.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger

from xentlab.data import build_datamodule
from xentlab.losses import build_loss
from xentlab.models import build_model
from xentlab.module import ClassifierModule

METRICS_FILE = "metrics.json"
# conf/ sits beside the package in the repository (installed editable by the scripts).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def build_run(cfg: DictConfig, output_dir: Path) -> tuple[pl.Trainer, ClassifierModule, pl.LightningDataModule]:
    """Everything a run needs, built (and so validated) before the first training step."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(seed=cfg.seed, **cfg.data)
    loss = build_loss(**cfg.loss, task=datamodule.task, class_counts=datamodule.class_counts)
    model = build_model(**cfg.model, in_features=datamodule.num_features, num_outputs=datamodule.num_classes)
    module = ClassifierModule(model, loss, task=datamodule.task, num_classes=datamodule.num_classes,
                              optimizer=instantiate(cfg.optimizer), run_params=flat_params(cfg))
    logger = TensorBoardLogger(save_dir=str(output_dir), name="", version="", **cfg.logger)
    trainer = pl.Trainer(**cfg.trainer, logger=logger, default_root_dir=str(output_dir))
    return trainer, module, datamodule


def flat_params(cfg: DictConfig) -> dict:
    """The run's choices as flat `group.key -> scalar` pairs (lists become strings), e.g. `loss.gamma`."""
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, f"{name}.")
            else:
                flat[name] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def train(cfg: DictConfig, output_dir: str | Path) -> dict:
    """Fit on the training split, test on the held-out split, write `metrics.json`; return its content."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    trainer, module, datamodule = build_run(cfg, output_dir)
    trainer.fit(module, datamodule=datamodule)
    status = "interrupted" if trainer.interrupted else "completed"
    final = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if not trainer.interrupted:
        final.update({k: float(v) for k, v in trainer.test(module, datamodule=datamodule, verbose=False)[0].items()})
    record = {"status": status, "duration_s": round(time.time() - started, 3), "epochs": trainer.current_epoch,
              "metrics": final}
    write_record(output_dir, cfg, record)
    return record


def write_record(output_dir: Path, cfg: DictConfig, record: dict) -> None:
    """metrics.json: the run's status and final metrics next to the plain values of its config."""
    record = {**record, "config": OmegaConf.to_container(cfg, resolve=True)}
    (output_dir / METRICS_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    logdir = Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else output_dir
    print(f"[xentlab] logs: {output_dir}\n[xentlab] view: tensorboard --logdir {logdir}")
    try:
        record = train(cfg, output_dir)
    except Exception as error:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            raise
        # In a sweep one failing job must not stop the others: record it for the report and move on.
        write_record(output_dir, cfg, {"status": "failed", "error": f"{type(error).__name__}: {error}",
                                       "traceback": traceback.format_exc(), "metrics": {}})
        print(f"[xentlab] job failed: {type(error).__name__}: {error}")
        return float("nan")
    return record["metrics"].get(cfg.objective, float("nan"))


if __name__ == "__main__":
    main()
