"""xentlab: study classification losses with one fused log-softmax core, Hydra sweeps and TensorBoard."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def config_dir() -> Path:
    """The folder of xentlab's Hydra configs (config.yaml, loss/, data/, ...).

    They ship as the package `xentlab.conf`, built from the repository's top-level conf/ (pyproject.toml maps
    one onto the other), so this is site-packages/xentlab/conf in an installed wheel and the repository's
    conf/ in an editable install. An editable install made before that mapping existed cannot import
    `xentlab.conf`; the repository's conf/ beside the package is then the same folder.
    """
    from importlib.resources import files

    try:
        return Path(str(files("xentlab.conf")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "conf"
