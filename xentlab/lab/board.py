"""xentlab's TensorBoard layout, in plain Python so the report can read event files without Lightning.

TensorBoard's Time Series sorts tag groups by name and opens only the first two, so the stage groups are
numbered: a logged `val/x` is the tag `1_val/x`, `test/x` is `2_test/x`, `train/x` is `3_train/x`.
metrics.json, the report and the sweeper's `objective` keep the plain names. A run's HParams session
and its `hp/` metrics live in the sub-run `<run>/hparams` (docs/metrics.md, TensorBoard views).
"""

from __future__ import annotations

BOARD_GROUPS = {"val": "1_val", "test": "2_test", "train": "3_train"}
HPARAMS_RUN = "hparams"


def board_tag(name: str) -> str:
    """The TensorBoard tag of a logged name: `val/x` -> `1_val/x`, `test/x` -> `2_test/x`,
    `train/x` -> `3_train/x`; other names unchanged."""
    stage, slash, rest = name.partition("/")
    return f"{BOARD_GROUPS[stage]}/{rest}" if slash and stage in BOARD_GROUPS else name
