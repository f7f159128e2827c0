"""Contractions spelled other ways than a plain einsum (graphprune.contractions): the equation written
for each computes what the call computes, and models using them prune, exactly."""
import string

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import graphprune
from graphprune import contractions
from oracle import dead_twin


@st.composite
def _einsum_case(draw):
    """A random einsum with an ellipsis on some operands (broadcast, right-aligned), and an output
    written, implicit, or naming the ellipsis somewhere other than first."""
    letters = draw(st.lists(st.sampled_from("abcdeXY"), min_size=1, max_size=4, unique=True))
    size = {c: draw(st.integers(1, 4)) for c in letters}
    width = draw(st.integers(0, 3))
    batch = [draw(st.integers(1, 3)) for _ in range(width)]
    specs, shapes = [], []
    for _ in range(draw(st.integers(1, 3))):
        own = draw(st.lists(st.sampled_from(letters), max_size=3, unique=True))
        span = draw(st.integers(0, width)) if draw(st.booleans()) else None
        spec = "".join(own) if span is None else draw(st.sampled_from(["...", ""])) + "".join(own)
        if span is not None and "..." not in spec:
            spec = "".join(own) + "..."
        shape = [size[c] for c in own]
        if span is not None:
            tail = [draw(st.sampled_from([b, 1])) for b in batch[width - span:]]
            shape = tail + shape if spec.startswith("...") else shape + tail
        specs.append(spec)
        shapes.append(shape)
    has_ellipsis = any("..." in s for s in specs)
    used = sorted(set("".join(s.replace("...", "") for s in specs)))
    out = draw(st.one_of(st.none(), st.lists(st.sampled_from(used), unique=True).map("".join) if used else st.just("")))
    eq = ",".join(specs)
    if out is not None:
        if has_ellipsis:
            cut = draw(st.integers(0, len(out)))
            out = out[:cut] + "..." + out[cut:]
        eq += "->" + out
    return eq, shapes


@settings(max_examples=150, deadline=None)
@given(_einsum_case(), st.integers(0, 10_000))
def test_an_explicit_equation_computes_what_the_ellipsis_one_does(case, seed):
    eq, shapes = case
    g = torch.Generator().manual_seed(seed)
    ops = [torch.randn(tuple(s), generator=g, dtype=torch.float64) for s in shapes]
    try:
        want = torch.einsum(eq, *ops)
    except RuntimeError:  # shapes the drawn equation does not take
        return
    written = contractions.explicit(eq, [t.dim() for t in ops])
    if written is None:
        return
    assert "." not in written and "->" in written
    torch.testing.assert_close(torch.einsum(written, *ops), want)


def test_explicit_refuses_what_does_not_fit():
    assert contractions.explicit("ab,bc", [2, 3]) is None          # ranks off
    assert contractions.explicit("a.b,bc->ac", [2, 2]) is None      # a stray dot
    assert contractions.explicit("...a,a->a", [3, 1]) is None       # an ellipsis summed out
    assert contractions.explicit("ab,bc", [2, 2]) == "ab,bc->ac"


_A, _B = torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
SPELLINGS = {  # name: (what the code calls, the equation written for it, its operands)
    "tensordot pairs": (lambda: torch.tensordot(_A, _B, dims=([2], [0])), contractions.tensordot(3, 2, ([2], [0])), (_A, _B)),
    "tensordot int": (lambda: torch.tensordot(_A, _B, dims=1), contractions.tensordot(3, 2, 1), (_A, _B)),
    "tensordot negative": (lambda: torch.tensordot(_A, _B.t(), dims=([-1], [1])), contractions.tensordot(3, 2, ([-1], [1])), (_A, _B.t())),
    "tensordot two": (lambda: torch.tensordot(_A, _A, dims=([1, 2], [1, 2])), contractions.tensordot(3, 3, ([1, 2], [1, 2])), (_A, _A)),
    "inner": (lambda: torch.inner(_A, _B.t()), contractions.inner(3, 2), (_A, _B.t())),
    "vecdot broadcast": (lambda: torch.linalg.vecdot(_A.unsqueeze(-2), _B.t()), contractions.vecdot(4, 2, -1), (_A.unsqueeze(-2), _B.t())),
    "vecdot dim": (lambda: torch.linalg.vecdot(_A, _A.flip(0), dim=1), contractions.vecdot(3, 3, 1), (_A, _A.flip(0))),
    "dot": (lambda: torch.dot(_B[:, 0], _B[:, 1]), contractions.dot(1, 1), (_B[:, 0], _B[:, 1])),
    "outer": (lambda: torch.outer(_B[:, 0], _B[0]), contractions.outer(1, 1), (_B[:, 0], _B[0])),
}


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_each_spelling_is_the_call(name):
    call, eq, ops = SPELLINGS[name]
    torch.testing.assert_close(torch.einsum(eq, *ops), call())
    assert contractions.outer(2, 1) is None and contractions.inner(0, 2) is None and contractions.tensordot(2, 2, 3) is None


class _Contracted(nn.Module):
    """A projection written as a contraction between two linears; ``how`` picks the spelling."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a = nn.Linear(8, 16)
        self.w = nn.Parameter(torch.randn(16, 12) * 0.3)
        self.out = nn.Linear(12, 4)

    def forward(self, x):                                                            # (B, T, 8)
        h = F.relu(self.a(x))                                                        # (B, T, 16)
        y = {"ellipsis": lambda: torch.einsum("...d,de->...e", h, self.w),
             "implicit": lambda: torch.einsum("btd,dz", h, self.w),
             "tensordot": lambda: torch.tensordot(h, self.w, dims=([2], [0])),
             "tensordot_int": lambda: torch.tensordot(h, self.w, dims=1),
             "inner": lambda: torch.inner(h, self.w.t()),
             "inner_method": lambda: h.inner(self.w.t()),
             "vecdot": lambda: torch.linalg.vecdot(h.unsqueeze(-2), self.w.t()),
             }[self.how]()                                                           # (B, T, 12)
        return self.out(F.relu(y))


@pytest.mark.parametrize("how", ["ellipsis", "implicit", "tensordot", "tensordot_int", "inner", "inner_method", "vecdot"])
def test_a_model_contracting_another_way_prunes_exactly(how):
    """Each spelling was "no rule" (or an einsum with an ellipsis), and the width it contracts stayed whole (survey 31b)."""
    torch.manual_seed(0)
    model = _Contracted(how).eval()
    x = torch.randn(2, 5, 8)
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l1")
    assert small.a.out_features < 16 and small.w.shape[0] == small.a.out_features, small.report.verify.blocked
    twin = dead_twin(model, small)
    for shape in [(2, 5, 8), (3, 7, 8)]:
        y = torch.randn(*shape)
        torch.testing.assert_close(small(y), twin(y))


class _Gated(nn.Module):
    """A contraction whose one side is non-zero where the other is removed: sigmoid(h) . h over the
    channels, written with an ellipsis. The removed channels add nothing only because h is zero there."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(8, 16)
        self.out = nn.Linear(1, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        g = torch.sigmoid(self.b(x))
        return self.out(torch.einsum("...d,...d->...", g, h).unsqueeze(-1))


def test_a_contracted_dim_with_one_side_nonzero_prunes_only_as_the_zeros_allow():
    torch.manual_seed(0)
    model = _Gated().eval()
    x = torch.randn(2, 5, 8)
    small = graphprune.compile(model, (x,), ratio=0.5, importance="l1")
    twin = dead_twin(model, small)
    for shape in [(2, 5, 8), (4, 3, 8)]:
        y = torch.randn(*shape)
        torch.testing.assert_close(small(y), twin(y))
    assert small.a.out_features == small.b.out_features  # the two sides go together


def test_letters_run_out_gracefully():
    eq = ",".join([string.ascii_letters[:26], string.ascii_letters[26:]]) + ",..."
    assert contractions.explicit(eq, [26, 26, 3]) is None
