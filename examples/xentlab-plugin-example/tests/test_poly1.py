"""The plugin's own tests: xentlab's conformance kit, plus what makes Poly-1 Poly-1."""

import pytest
import torch
from xentlab_poly import Poly1CrossEntropy

from xentlab import functional as F
from xentlab.losses import build_loss, get_loss
from xentlab.testing import check_loss


@pytest.mark.parametrize("task", ["multiclass", "binary"])
def test_poly1_passes_the_conformance_kit_by_name(task):
    report = check_loss("poly1", task=task)
    assert report.ok, report


@pytest.mark.parametrize("epsilon", [-1.0, 0.5, 4.0])
def test_poly1_passes_the_conformance_kit_for_other_epsilons(epsilon):
    assert check_loss(Poly1CrossEntropy(epsilon=epsilon), task="multiclass").ok


def test_registered_with_its_yaml_defaults():
    entry = get_loss("poly1")
    assert entry.cls is Poly1CrossEntropy
    assert entry.parameters()["epsilon"] == 1.0
    assert build_loss("poly1", task="multiclass").epsilon == 1.0


def test_poly1_is_ce_plus_epsilon_times_one_minus_p_true():
    torch.manual_seed(0)
    x, y = torch.randn(7, 5), torch.tensor([0, 1, 2, 3, 4, -100, 2])
    kept = y != -100
    p_true = x[kept].softmax(1)[torch.arange(int(kept.sum())), y[kept]]
    expected = torch.nn.functional.cross_entropy(x, y) + 2.0 * (1 - p_true).mean()
    torch.testing.assert_close(Poly1CrossEntropy(epsilon=2.0)(x, y), expected)
    torch.testing.assert_close(Poly1CrossEntropy(epsilon=0.0)(x, y), F.cross_entropy(x, y))


def test_epsilon_below_minus_one_is_refused():
    with pytest.raises(ValueError, match="epsilon"):
        Poly1CrossEntropy(epsilon=-2.0)
