"""Every registered loss is a `loss=` choice, whether or not it ships a YAML.

A built-in loss, or a plugin with a Hydra search-path plugin, has `loss/<name>.yaml` on Hydra's search
path. A plugin registered by its entry point alone (`squared_hinge = my_pkg:SquaredHinge`) has none, and
Hydra would answer `loss=squared_hinge` with "Could not find 'loss/squared_hinge'". Such a loss gets a
config in Hydra's ConfigStore, the source Hydra reads after the search path, so Hydra lists it with the
YAMLs' choices, in `--help` and in its "Could not find" message.

Two steps, so that starting `xentlab-train` (and `--help`) imports no plugin and no torch:
`store_loss_configs` stores `{name: <entry point name>}` from the installed distributions' metadata, and
`with_signature_defaults`, once a run's config is composed and its loss about to be checked, adds the
parameters of the loss's constructor with their defaults (`???`, Hydra's "required", where there is
none; the loss check then names it). A loss whose YAML is on the search path gets no stored config: Hydra
would otherwise merge the two ("automatic schema matching") and warn. A module entry point
(`name = my_pkg.losses`, registering its losses by decorator) names no loss before it is imported: its
losses are `loss=` choices through their YAMLs only.
"""

from __future__ import annotations

import importlib.metadata
import logging

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# xentlab.losses.ENTRY_POINT_GROUP, not imported from there: the registry imports torch.
ENTRY_POINT_GROUP = "xentlab.losses"
PROVIDER = "xentlab"
_STORED: set[str] = set()  # the losses given a config here


def store_loss_configs(config_dir: str) -> list[str]:
    """Stores the config `{name: <name>}` in the `loss` group for every `name = pkg.module:Class` entry
    point that no `loss/<name>.yaml` on Hydra's search path (rooted at `config_dir`, the primary config's
    folder) configures; returns their names."""
    named = sorted({point.name for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
                    if ":" in point.value})
    if not named:
        return []
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_store import ConfigStore

    configured = set(ConfigRepository(create_config_search_path(config_dir)).get_group_options("loss"))
    stored = [name for name in named if name not in configured or name in _STORED]
    for name in stored:
        ConfigStore.instance().store(group="loss", name=name, node={"name": name}, provider=PROVIDER)
    _STORED.update(stored)
    return stored


def with_signature_defaults(loss: DictConfig, choice: str | None) -> DictConfig:
    """`loss` with the constructor's parameters and defaults under its own values, when it is the config
    stored for `choice`; otherwise `loss` itself. A default a config cannot hold (a tensor, an object) is
    left out: the constructor keeps it, and `loss.<parameter>=` still sets it, the loss group being open.
    A plugin whose entry point fails to load is a ValueError naming the loss."""
    if choice not in _STORED or loss.get("name") != choice or "_target_" in loss:
        return loss
    from xentlab.losses import get_loss

    try:
        entry = get_loss(choice)
    except ValueError as error:  # its entry point failed to load (the registry warned why)
        raise ValueError(f"loss={choice}: {error}") from error  # a ConfigError once name_the_loss has it
    defaults = {"name": choice}
    for key, value in entry.parameters().items():
        value = list(value) if isinstance(value, tuple) else value
        try:
            OmegaConf.create({key: value})
        except Exception:  # noqa: BLE001 - omegaconf raises several types for values it cannot hold
            log.debug("loss %s: default of %s (%r) kept out of its config", choice, key, value)
            continue
        defaults[key] = value
    completed = OmegaConf.merge(defaults, loss)
    OmegaConf.set_struct(completed, False)  # open, as every loss group is (xentlab.lab.validation)
    return completed
