"""Shape propagation: the formulas that stand in for meta kernels agree with real runs."""
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from graphprune.trace import _module_shape


@settings(max_examples=60, deadline=None)
@given(dims=st.integers(1, 3), cin=st.integers(1, 4), cout=st.integers(1, 4), k=st.integers(1, 4), stride=st.integers(1, 3),
       pad=st.integers(0, 2), dil=st.integers(1, 2), size=st.integers(5, 9), groups=st.sampled_from([1, 2]))
def test_conv_formula_matches_the_kernel(dims, cin, cout, k, stride, pad, dil, size, groups):
    cin, cout = cin * groups, cout * groups
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](cin, cout, k, stride, pad, dil, groups)
    x = torch.randn(2, cin, *([size] * dims))
    if (size + 2 * pad - dil * (k - 1) - 1) < 0:
        return  # the input is smaller than the kernel; the real conv raises
    assert tuple(_module_shape(conv, x)) == tuple(conv(x).shape)


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), oh=st.one_of(st.none(), st.integers(1, 4)), ow=st.integers(1, 4),
       batched=st.booleans())
def test_adaptive_pool_and_linear_formulas(h, w, oh, ow, batched):
    pool = nn.AdaptiveAvgPool2d((oh, ow))
    x = torch.randn(*((2,) if batched else ()), 3, h, w)
    assert tuple(_module_shape(pool, x)) == tuple(pool(x).shape)
    lin = nn.Linear(w, 5)
    assert tuple(_module_shape(lin, x)) == tuple(lin(x).shape)


def test_formulas_step_aside_for_odd_inputs():
    """Where the formula does not apply, the real kernel runs (and raises its own error)."""
    assert _module_shape(nn.Conv2d(3, 4, 3, padding="same"), torch.randn(1, 3, 8, 8)) is None
    assert _module_shape(nn.Conv2d(3, 4, 3), torch.randn(1, 5, 8, 8)) is None          # wrong channel count
    assert _module_shape(nn.Linear(4, 2), torch.randn(3, 4, dtype=torch.float64)) is None  # dtype mismatch


def test_formulas_check_the_parameters():
    """A pass that breaks a weight must still fail the meta run."""
    conv, lin = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)
    conv.weight = nn.Parameter(torch.zeros(4, 2, 3, 3))
    lin.bias = nn.Parameter(torch.zeros(3))
    assert _module_shape(conv, torch.randn(1, 3, 8, 8)) is None
    assert _module_shape(lin, torch.randn(3, 4)) is None
