"""Loss registry and the built-in losses: `build_loss("focal", task="multiclass", gamma=1.0)`.

registry.py: the three ways a loss gets in (built-in, entry point, `_target_`) and the class-count hook.
"""

from xentlab.losses import builtin  # noqa: F401  (registers the built-ins)
from xentlab.losses.registry import (
    ENTRY_POINT_GROUP,
    TASKS,
    BrokenPlugin,
    LossEntry,
    broken_plugins,
    build_loss,
    get_loss,
    list_losses,
    losses_for_task,
    register_loss,
)

__all__ = ["ENTRY_POINT_GROUP", "TASKS", "BrokenPlugin", "LossEntry", "broken_plugins", "build_loss",
           "get_loss", "list_losses", "losses_for_task", "register_loss"]
