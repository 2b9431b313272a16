"""The plugin's own tests: xentlab's conformance kit, plus what makes Poly-2 Poly-2."""

import pytest
import torch
from xentlab_poly import Poly2CrossEntropy

from xentlab import functional as F
from xentlab.losses import build_loss, get_loss
from xentlab.testing import check_loss


@pytest.mark.parametrize("task", ["multiclass", "binary"])
def test_poly2_passes_the_conformance_kit_by_name(task):
    report = check_loss("poly2", task=task)
    assert report.ok, report


@pytest.mark.parametrize(("epsilon1", "epsilon2"), [(-1.0, 0.0), (0.5, -0.2), (4.0, 3.0)])
def test_poly2_passes_the_conformance_kit_for_other_epsilons(epsilon1, epsilon2):
    assert check_loss(Poly2CrossEntropy(epsilon1=epsilon1, epsilon2=epsilon2), task="multiclass").ok


def test_registered_with_its_yaml_defaults():
    entry = get_loss("poly2")
    assert entry.cls is Poly2CrossEntropy
    assert entry.parameters()["epsilon2"] == 1.0
    assert build_loss("poly2", task="multiclass").epsilon1 == 1.0


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_poly2_is_ce_plus_two_polynomial_terms(backend):
    torch.manual_seed(0)
    x, y = torch.randn(7, 5, dtype=torch.float64, requires_grad=True), torch.tensor([0, 1, 2, 3, 4, -100, 2])
    kept = y != -100
    p_true = x[kept].softmax(1)[torch.arange(int(kept.sum())), y[kept]]
    expected = torch.nn.functional.cross_entropy(x, y) + (2.0 * (1 - p_true) + 0.5 * (1 - p_true) ** 2).mean()
    loss = Poly2CrossEntropy(epsilon1=2.0, epsilon2=0.5)
    row = loss.row_loss
    ours = F.softmax_loss(x, y, row, backend=backend)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(expected, x)[0])
    torch.testing.assert_close(Poly2CrossEntropy(epsilon1=0.0, epsilon2=0.0)(x, y), F.cross_entropy(x, y))


def test_epsilons_that_reward_wrong_answers_are_refused():
    with pytest.raises(ValueError, match="epsilon"):
        Poly2CrossEntropy(epsilon1=-2.0, epsilon2=0.0)
