"""An example xentlab loss plugin: Poly-2 cross-entropy, registered as `poly2`."""

__all__ = ["Poly2CrossEntropy"]


def __getattr__(name: str):
    # Imported on first use, not here: Hydra imports this package on every `xentlab-train` start to read
    # its conf/ (the search-path plugin), and importing the loss would import torch there, ~1 s each time.
    if name == "Poly2CrossEntropy":
        from xentlab_poly.poly import Poly2CrossEntropy

        return Poly2CrossEntropy
    raise AttributeError(f"module 'xentlab_poly' has no attribute {name!r}")
