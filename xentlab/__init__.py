"""xentlab: study classification losses with one fused log-softmax core, Hydra sweeps and TensorBoard."""

__version__ = "0.1.0"
