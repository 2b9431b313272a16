"""xentlab's functional losses against their peers' own test inputs and formulas, so that an upgrade of
PyTorch that changes a loss's semantics (or its sample inputs) shows up here.

- PyTorch's OpInfo sample inputs (`torch.testing._internal.common_methods_invocations`) for
  `nn.functional.cross_entropy`, `binary_cross_entropy_with_logits` and `mse_loss`: every sample is either
  matched (value, and the gradients of every input that requires grad) or refused with the documented
  error, listed in REFUSALS. Samples with a class weight are also run with that weight made non-negative,
  so the weighted paths are compared too.
- torchvision's `sigmoid_focal_loss` (its formula verbatim, tests/_cases.py) on drawn inputs.
- The ASL authors' code (tests/_cases.py `ridnik_asl`): equal on hard targets; on soft targets xentlab's
  documented linear mixing, which differs from the authors' interpolation.
"""

from __future__ import annotations

import math

import pytest
import torch
from _cases import make_binary_target, make_logits, ridnik_asl, torchvision_sigmoid_focal_loss
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from xentlab import functional as XF

_SCRIPT_CALLS = (torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__)
common_methods_invocations = pytest.importorskip(
    "torch.testing._internal.common_methods_invocations",
    reason="PyTorch's test internals need the expecttest package (pip install -e '.[dev]')")
# Importing PyTorch's test internals sets process-wide state meant for PyTorch's own suite: it freezes the
# torch.backends flags (Lightning's Trainer sets cudnn.benchmark, which then raises) and wraps TorchScript
# calls. Undone at once, so the rest of the session runs as it would without this module.
torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__ = _SCRIPT_CALLS

# PyTorch's function, and xentlab's loss called with PyTorch's arguments
OURS = {
    "nn.functional.cross_entropy": XF.cross_entropy,
    "nn.functional.binary_cross_entropy_with_logits": XF.binary_cross_entropy_with_logits,
    # xentlab's MSE is a classification loss; on="logits" against a float target is F.mse_loss
    "nn.functional.mse_loss": lambda input, target, **kw: XF.mse_loss(input, target, on="logits", **kw),
}


def _negative_weight(sample) -> bool:
    weight = sample.kwargs.get("weight")
    return weight is not None and bool((weight < 0).any())


# The documented differences: (why, predicate on an op's sample, the error xentlab raises); PyTorch accepts
# these samples.
REFUSALS = [
    ("class weights must be finite and >= 0 (docs/losses.md, Checks)", lambda op, s: _negative_weight(s),
     r"weight must be finite and >= 0"),
    ("MSE is a loss over classes: a 0-d input has no class dimension",
     lambda op, s: op.name == "nn.functional.mse_loss" and s.input.dim() == 0,
     r"input must have a class dimension"),
]

OPS = [op for op in common_methods_invocations.op_db if op.name in OURS]
DTYPES = [torch.float64, torch.float32]


def test_the_peer_ops_are_all_found_and_the_session_is_left_as_it_was():
    assert sorted(op.name for op in OPS) == sorted(OURS)
    assert not torch.backends.flags_frozen()


def _samples(op, dtype):
    return list(op.sample_inputs("cpu", dtype, requires_grad=True))


def _refusal(op, sample):
    return next((refusal for refusal in REFUSALS if refusal[1](op, sample)), None)


def _leaves(sample) -> list[torch.Tensor]:
    tensors = [sample.input, *sample.args, *sample.kwargs.values()]
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]


def _compare(op, sample):
    """Value and every gradient of xentlab's loss against PyTorch's, on one sample."""
    args = (sample.input, *sample.args)
    leaves = _leaves(sample)
    want = op.op(*args, **sample.kwargs)
    got = OURS[op.name](*args, **sample.kwargs)
    assert_close(got, want)
    upstream = torch.linspace(0.5, 1.5, want.numel(), dtype=want.dtype).view(want.shape)
    expected = torch.autograd.grad(want, leaves, upstream, allow_unused=True, materialize_grads=True)
    for name, g, e in zip(range(len(leaves)), torch.autograd.grad(got, leaves, upstream, allow_unused=True,
                                                                   materialize_grads=True), expected,
                          strict=True):
        assert_close(g, e, msg=lambda m, name=name: f"gradient of leaf {name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_opinfo_samples_match_or_are_refused_as_documented(op, dtype):
    counts = {"matched": 0, "refused": 0}
    for sample in _samples(op, dtype):
        refusal = _refusal(op, sample)
        if refusal is not None:
            with pytest.raises(ValueError, match=refusal[2]):
                OURS[op.name](sample.input, *sample.args, **sample.kwargs)
            counts["refused"] += 1
        else:
            _compare(op, sample)
            counts["matched"] += 1
    assert counts["matched"] >= 5, counts  # most samples are compared, not waved through


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", [op for op in OPS if op.name != "nn.functional.mse_loss"],
                         ids=lambda op: op.name)
def test_opinfo_weighted_samples_match_with_their_weights_made_nonnegative(op, dtype):
    """PyTorch draws weights from [-9, 9]; the same samples with |weight| (a constant, as PyTorch requires of
    cross_entropy's weight) are compared in full."""
    weighted = [s for s in _samples(op, dtype) if "weight" in s.kwargs]
    assert weighted
    for sample in weighted:
        sample.kwargs["weight"] = sample.kwargs["weight"].detach().abs()
        _compare(op, sample)


# ---------------------------------------------------------------- torchvision's sigmoid focal loss


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), c=st.integers(1, 5), seed=st.integers(0, 2**16), soft=st.booleans(),
       alpha=st.sampled_from([0.25, 0.5, -1.0]), gamma=st.sampled_from([0.0, 0.5, 2.0, 3.0]),
       reduction=st.sampled_from(["none", "mean", "sum"]))
def test_sigmoid_focal_loss_is_torchvisions(n, c, seed, soft, alpha, gamma, reduction):
    x = make_logits(n, c, seed=seed, scale=4.0).requires_grad_()
    t = make_binary_target(n, c, soft=soft, seed=seed + 1)
    expected = torchvision_sigmoid_focal_loss(x, t, alpha, gamma, reduction)
    got = XF.sigmoid_focal_loss(x, t, alpha, gamma, reduction)
    assert_close(got, expected)
    upstream = torch.rand(expected.shape, dtype=expected.dtype, generator=torch.Generator().manual_seed(seed))
    assert_close(torch.autograd.grad(got, x, upstream)[0], torch.autograd.grad(expected, x, upstream)[0])


# ---------------------------------------------------------------- the ASL authors' code


ASL_PARAMETERS = [(0.0, 4.0, 0.05), (1.0, 4.0, 0.05), (2.0, 1.0, 0.0)]


@pytest.mark.parametrize("gamma_pos, gamma_neg, clip", ASL_PARAMETERS)
def test_asl_on_hard_targets_is_the_authors(gamma_pos, gamma_neg, clip):
    x = make_logits(40, 6, scale=4.0).requires_grad_()
    t = make_binary_target(40, 6)
    expected = ridnik_asl(x, t, gamma_pos, gamma_neg, clip, "none")
    got = XF.asymmetric_loss(x, t, gamma_pos, gamma_neg, clip, reduction="none")
    assert_close(got, expected)
    assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0])


@pytest.mark.parametrize("gamma_pos, gamma_neg, clip", ASL_PARAMETERS)
def test_asl_on_soft_targets_mixes_the_hard_losses_linearly_unlike_the_authors(gamma_pos, gamma_neg, clip):
    """The documented definition: l(x, t) = t l(x, 1) + (1-t) l(x, 0), the expected hard-label loss. The
    authors interpolate gamma and p_t instead; the two differ wherever 0 < t < 1 and gamma > 0."""
    x = make_logits(40, 6, scale=4.0)
    t = make_binary_target(40, 6, soft=True)
    soft = (t > 0) & (t < 1)
    assert soft.sum() > 20

    def ours(target):
        return XF.asymmetric_loss(x, target, gamma_pos, gamma_neg, clip, reduction="none")

    mixed = t * ours(torch.ones_like(t)) + (1 - t) * ours(torch.zeros_like(t))
    assert_close(ours(t), mixed)
    authors = ridnik_asl(x, t, gamma_pos, gamma_neg, clip, "none")
    differs = ~torch.isclose(ours(t), authors, rtol=1e-4, atol=1e-6)
    assert differs[soft].float().mean() > 0.5
    assert not differs[~soft].any()


def test_the_peer_formulas_agree_on_bce():
    """ASL with no focusing or clipping, sigmoid focal with gamma 0 and no alpha, and BCE: one loss."""
    x = make_logits(30, 4, scale=3.0)
    t = make_binary_target(30, 4, soft=True)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, t)
    assert_close(XF.asymmetric_loss(x, t, 0.0, 0.0, 0.0), bce)
    assert_close(XF.sigmoid_focal_loss(x, t, -1.0, 0.0), bce)
    assert math.isfinite(bce.item())
