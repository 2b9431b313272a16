"""xentlab's Hydra configs, shipped as package data `xentlab.conf` (see pyproject.toml)."""
