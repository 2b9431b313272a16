"""Built-in losses: thin nn.Module wrappers over xentlab.functional, registered by name."""

from __future__ import annotations

from torch import nn

from xentlab import functional as F
from xentlab.losses.registry import register_loss


@register_loss("ce", tasks=("multiclass", "binary"))
class CrossEntropy(nn.Module):
    """Cross-entropy on softmax logits (xentlab.functional.cross_entropy)."""

    def forward(self, logits, target):
        return F.cross_entropy(logits, target)
