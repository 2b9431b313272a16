"""An example xentlab loss plugin: Poly-1 cross-entropy, registered as `poly1`."""

from xentlab_poly.poly import Poly1CrossEntropy

__all__ = ["Poly1CrossEntropy"]
