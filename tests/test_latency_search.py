"""The threshold search under a budget (``allocate._bisect``) on cost curves with known answers.

FLOPs and parameter budgets bisect to neighbouring thresholds; a latency budget,
where every reading is a timing of seconds to minutes, interpolates and stops
within ``LAND_TOL`` under the target. Both must keep the invariant the callers
rely on (``lo`` above the target, ``hi`` at or below it) on any decreasing curve,
with plateaus (widths rounded to a multiple build the same model for runs of
thresholds) and bends (latency floors)."""
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from graphprune.allocate import LAND_TOL, _bisect


def curve(n: int, knots: list[float], plateau: int):
    """A non-increasing cost over ``n`` thresholds from 1.0 down, piecewise linear
    through ``knots`` (sorted decreasing), constant over runs of ``plateau``."""
    xs = np.linspace(0, n - 1, len(knots) + 2)
    ys = np.concatenate([[1.0], np.sort(knots)[::-1], [min(knots) * 0.5]])
    values = np.interp((np.arange(n) // plateau) * plateau, xs, ys)
    calls = []

    def cost(i: int):
        calls.append(i)
        return None, float(values[i])

    return cost, values, calls


@settings(max_examples=150, deadline=None)
@given(n=st.integers(3, 200_000), knots=st.lists(st.floats(0.02, 0.98), min_size=1, max_size=6),
       plateau=st.sampled_from([1, 1, 16, 500]), target=st.floats(0.05, 0.95))
def test_search_keeps_the_invariant_and_lands(n, knots, plateau, target):
    for kind in ("flops", "latency"):
        cost, values, calls = curve(n, knots, plateau)
        if values[-1] > target:
            return
        lo, hi = _bisect(cost, n, target, kind)
        assert values[hi] <= target
        if lo is None:
            assert values[0] <= target and hi == 0
            continue
        assert values[lo] > target and lo < hi
        steps = len(set(calls))
        if kind == "flops":  # exact: the neighbour of the first threshold above the target
            assert hi - lo == 1 and steps <= math.ceil(math.log2(n)) + 3
        else:  # close enough, never more than three times bisection's steps
            assert hi - lo == 1 or values[hi] >= target * (1 - LAND_TOL)
            assert steps <= 3 * math.ceil(math.log2(n)) + 3


def test_latency_search_times_few_candidates_on_a_smooth_curve():
    """A cost bent once (steep, then flat, as latency near a floor): bisection to neighbours
    over 100,000 thresholds reads 17 or more; the latency search lands within LAND_TOL
    in a few, both ends included."""
    n = 100_000
    for target in (0.27, 0.3, 0.45, 0.5, 0.8):
        cost, values, calls = curve(n, [0.5], 1)
        _, hi = _bisect(cost, n, target, "flops")
        exact = len(set(calls))
        cost, values, calls = curve(n, [0.5], 1)
        _, hi = _bisect(cost, n, target, "latency")
        assert target * (1 - LAND_TOL) <= values[hi] <= target
        assert exact >= 17 and len(set(calls)) <= 6


def test_settling_a_noisy_search_resumes_instead_of_starting_over():
    """``_landed`` re-times the final pair until it stops moving. Readings of every model
    carry +-4% noise that changes with each reading: resumed from its bracket, the
    search settles after a few more timings; restarted, an interpolating search takes
    a new path through models never timed each time a reading moves."""
    from graphprune.allocate import Readings, _landed

    n, target = 50_000, 0.3
    truth = 1.0 - 0.92 * np.arange(n) / (n - 1)  # a floor of 0.08
    rng = np.random.default_rng(0)

    class Meter:  # a removal is {group 0: the first i units}: threshold i
        def __call__(self, removed):
            i = len(removed.get(0, ()))
            return 1.0 if i == 0 else float(truth[i] * (1 + rng.uniform(-0.04, 0.04)))

    readings = Readings(Meter())
    removed, _ = _landed(readings, lambda i: ({0: range(i)}, readings({0: range(i)})), n, target)
    chosen = truth[len(removed[0])]
    timed = sum(len(v) for k, v in readings.pools.items() if k)
    assert target * 0.9 <= chosen <= target * 1.05
    assert timed <= 16


def staircase(n: int, steps: int, bend: float):
    """Latency against the threshold index as real models show it: bent (most of the time goes
    early, where the thresholds empty the cheap-scoring wide layers), in flat runs and
    jumps of uneven size, down to a floor of 0.1; and an estimate of it, a ratio too (1.0 with
    nothing removed) that bends a little differently and has a smooth error of its own, as
    a latency table's does."""
    rng = np.random.default_rng(steps)
    x = np.arange(n) / (n - 1)
    smooth = 0.1 + 0.9 * (1 - x) ** bend                                   # (n,) 1 -> 0.1
    edges = np.sort(rng.choice(np.arange(1, n), steps - 1, replace=False))
    at = np.concatenate([[0], edges])[np.searchsorted(edges, np.arange(n), side="right")]
    values = smooth[at]                                                     # constant between edges
    estimate = values ** 1.15 + 0.004 * np.sin(x * 7)
    return values, estimate


def test_a_guided_search_reads_fewer_candidates_on_a_bent_staircase():
    n = 30_000
    plain_reads, guided_reads = [], []
    for steps in (60, 300):
        for bend in (3.0, 6.0):
            values, estimate = staircase(n, steps, bend)
            for target in (0.3, 0.45, 0.6):
                for guess, reads in ((None, plain_reads), (lambda i: float(estimate[i]), guided_reads)):
                    calls = []
                    lo, hi = _bisect(lambda i: (calls.append(i), (None, float(values[i])))[1], n, target, "latency",
                                     guess=guess)
                    assert values[hi] <= target and values[lo] > target
                    reads.append(len(set(calls)))
    assert np.mean(guided_reads) <= 0.6 * np.mean(plain_reads) and max(guided_reads) <= 8


@settings(max_examples=100, deadline=None)
@given(n=st.integers(3, 100_000), knots=st.lists(st.floats(0.02, 0.98), min_size=1, max_size=6),
       plateau=st.sampled_from([1, 16, 500]), target=st.floats(0.05, 0.95),
       wrong=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=8))
def test_a_wrong_guess_costs_steps_never_the_result(n, knots, plateau, target, wrong):
    """Any guess (here unrelated to the curve and not even monotone) keeps the invariant
    and the bound of three times bisection's steps."""
    cost, values, calls = curve(n, knots, plateau)
    if values[-1] > target:
        return
    guess = lambda i: float(np.interp(i, np.linspace(0, n - 1, len(wrong)), wrong))  # noqa: E731
    lo, hi = _bisect(cost, n, target, "latency", guess=guess)
    assert values[hi] <= target
    if lo is not None:
        assert values[lo] > target and lo < hi
        assert hi - lo == 1 or values[hi] >= target * (1 - LAND_TOL)
    assert len(set(calls)) <= 3 * math.ceil(math.log2(n)) + 3
