"""Loss registry and the built-in losses."""

from xentlab.losses import builtin  # noqa: F401  (registers the built-ins)
from xentlab.losses.registry import build_loss, get_loss, register_loss

__all__ = ["build_loss", "get_loss", "register_loss"]
