"""The module form holds inputs the example gave as None to None (``graphprune.none_inputs``).

Survey 33 f07: ``forward(x, pick=None)`` reading ``h[:, pick]``, compiled from ``(x,)``, came
back in the user's class and, called with ``pick``, read renumbered hidden units: 0.61 off the
original with the removed channels dead. Nothing had run that path. These tests hold each way an
unseen input reaches the forward (a None default, a None given by name or position, a dict key,
a ``**kwargs`` keyword) to a refusal, and the same models given those inputs in the example to
their dead twin at every value.
"""
import copy
import dataclasses
import io
from typing import Optional

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import graphprune
from graphprune.none_inputs import HeldToNone
from oracle import dead_twin


class Probe(nn.Module):
    """An optional input that indexes hidden units, one that scales them, one over time."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(2, 4)

    def forward(self, x, pick=None, chan_mask=None, row_mask=None):
        h = torch.relu(self.a(x))  # (N, 16)
        out = self.b(h if chan_mask is None else h * chan_mask)
        if pick is not None:
            out = out + self.c(h[:, pick])
        if row_mask is not None:
            out = out * row_mask[:, None]
        return out


def _inputs():
    torch.manual_seed(0)
    return torch.randn(4, 8), {"pick": torch.tensor([2, 5]), "chan_mask": (torch.rand(16) > 0.3).float(),
                               "row_mask": torch.tensor([1.0, 0.0, 1.0, 1.0])}


def _compile(model, x, **kw):
    return graphprune.compile(model, (x,), ratio=0.5, importance="l1", **kw)


@pytest.mark.parametrize("given_as", ["omitted", "keyword None", "positional None"])
def test_a_value_for_an_input_the_example_left_none_is_refused(given_as):
    torch.manual_seed(0)
    model, (x, values) = Probe().eval(), _inputs()
    if given_as == "omitted":
        small = _compile(model, x)
    elif given_as == "keyword None":
        small = _compile(model, x, example_kwargs={k: None for k in values})
    else:
        small = graphprune.compile(model, (x, None, None, None), ratio=0.5, importance="l1")
    assert small.report.form == "module" and small.a.out_features < 16
    assert "pick=None" in small.report.form_why
    twin = dead_twin(model, small)
    with torch.no_grad():
        torch.testing.assert_close(small(x), twin(x), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(small(x, pick=None), twin(x), atol=1e-6, rtol=1e-5)
    for k, v in values.items():
        with pytest.raises(graphprune.GraphpruneError, match=f"example with {k}=None.*example that gives {k}"):
            small(x, **{k: v})
    with pytest.raises(graphprune.GraphpruneError, match="pick=None"):
        small(x, values["pick"])  # by position too


@settings(max_examples=6, deadline=None)
@given(st.sets(st.sampled_from(["pick", "chan_mask", "row_mask"]), min_size=1))
def test_inputs_the_example_gives_match_the_twin_at_other_values(names):
    """Given in the example, an input's path is traced: the groups it reads stay whole or are
    pruned to match, and the result takes any value there."""
    torch.manual_seed(0)
    model, (x, values) = Probe().eval(), _inputs()
    given_now = {k: values[k] for k in names}
    small = _compile(model, x, example_kwargs=given_now)
    twin = dead_twin(model, small)
    others = {"pick": torch.tensor([0, 15]), "chan_mask": torch.rand(16), "row_mask": torch.rand(4)}
    with torch.no_grad():
        for call in (given_now, {k: others[k] for k in names}):
            torch.testing.assert_close(small(x, **call), twin(x, **call), atol=1e-5, rtol=1e-5)
    for k in set(values) - set(names):
        with pytest.raises(graphprune.GraphpruneError, match=f"{k}=None"):
            small(x, **{k: values[k]})


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x, centre: Optional[bool] = None):
        h = torch.relu(self.a(x))
        if centre:
            h = h - 0.5  # the same on each hidden unit: prunable on both paths
        return self.b(h)


def test_a_setting_the_checks_flip_stays_open():
    torch.manual_seed(0)
    model, x = Flagged().eval(), torch.randn(4, 8)
    small = _compile(model, x)
    assert small.report.form == "module" and "centre=None" not in small.report.form_why and small.a.out_features < 16
    twin = dead_twin(model, small)
    with torch.no_grad():
        torch.testing.assert_close(small(x, centre=True), twin(x, centre=True), atol=1e-5, rtol=1e-5)


class Batched(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, batch, **extra):
        h = torch.relu(self.a(batch["x"]))
        for gate in (batch.get("gate"), extra.get("gate")):
            if gate is not None:
                h = h * gate  # (16,): one per hidden unit
        return self.b(h)


def test_a_key_or_keyword_the_example_lacked_is_refused():
    torch.manual_seed(0)
    model, x, gate = Batched().eval(), torch.randn(4, 8), torch.rand(16)
    small = graphprune.compile(model, ({"x": x},), ratio=0.5, importance="l1")
    assert small.report.form == "module" and small.a.out_features < 16
    with torch.no_grad():
        torch.testing.assert_close(small({"x": x}), dead_twin(model, small)({"x": x}), atol=1e-6, rtol=1e-5)
    with pytest.raises(graphprune.GraphpruneError, match="'gate'"):
        small({"x": x, "gate": gate})
    with pytest.raises(graphprune.GraphpruneError, match="'gate'"):
        small({"x": x}, gate=gate)
    held = graphprune.compile(model, ({"x": x, "gate": None},), ratio=0.5, importance="l1")
    with pytest.raises(graphprune.GraphpruneError, match=r"batch\['gate'\]=None"):
        held({"x": x, "gate": gate})


def test_the_refusal_survives_copy_pickle_save_load_and_a_second_compile(tmp_path):
    torch.manual_seed(0)
    model, (x, values) = Probe().eval(), _inputs()
    small = _compile(model, x)
    buf = io.BytesIO()
    torch.save(small, buf)
    buf.seek(0)
    graphprune.save(small, tmp_path / "out")
    loaded = graphprune.load(Probe().eval(), tmp_path / "out")
    again = _compile(small, x)
    for m in (copy.deepcopy(small), torch.load(buf, weights_only=False), loaded, again):
        with torch.no_grad():
            torch.testing.assert_close(m(x), (again if m is again else small)(x), atol=1e-6, rtol=1e-5)
        with pytest.raises(graphprune.GraphpruneError, match="pick=None"):
            m(x, pick=values["pick"])
        assert sum(isinstance(h, HeldToNone) for h in m._forward_pre_hooks.values()) == 1
    torch.testing.assert_close(loaded(x), small(x))
    assert not model._forward_pre_hooks  # the user's model is untouched
    with pytest.raises(graphprune.GraphpruneError, match="pick=None"):
        _compile(small, x, example_kwargs=values)  # the path is no more checked for a second compile


class Starred(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x, *gates):
        h = torch.relu(self.a(x))
        for g in gates:
            h = h * g  # (16,): one per hidden unit
        return self.b(h)


def test_more_positional_inputs_than_the_example_gave_are_refused():
    torch.manual_seed(0)
    model, x, gate = Starred().eval(), torch.randn(4, 8), torch.rand(16)
    small = _compile(model, x)
    assert small.report.form == "module" and small.a.out_features < 16 and "0 item(s) in gates" in small.report.form_why
    with pytest.raises(graphprune.GraphpruneError, match=r"item\(s\) in gates"):
        small(x, gate)
    held = graphprune.compile(model, (x, gate), ratio=0.5, importance="l1")
    twin = dead_twin(model, held)
    with torch.no_grad():
        torch.testing.assert_close(held(x, gate.flip(0)), twin(x, gate.flip(0)), atol=1e-6, rtol=1e-5)
    with pytest.raises(graphprune.GraphpruneError, match=r"item\(s\) in gates"):
        held(x, gate, gate)


@dataclasses.dataclass
class _Batch:
    x: torch.Tensor
    drop: Optional[torch.Tensor] = None


torch.export.register_dataclass(_Batch)  # as a user passing one to torch.export does


class Picky(nn.Module):
    """A dataclass batch and a list of dict batches whose None fields drop hidden units (survey 38 f02, f06)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x, batch: Optional[_Batch] = None, items=()):
        h = torch.relu(self.a(x))
        for d in ([batch.drop] if batch is not None else []) + [it.get("drop") for it in items]:
            if d is not None:
                h = h.index_fill(1, d, 0.0)
        return self.b(h)


def test_a_dataclass_field_and_a_longer_list_are_held_too():
    torch.manual_seed(0)
    model, x = Picky().eval(), torch.randn(4, 8)
    small = graphprune.compile(model, (x,), example_kwargs={"batch": _Batch(x), "items": [{"drop": None}]},
                               ratio=0.5, importance="l1")
    assert small.report.form == "module" and small.a.out_features < 16
    with torch.no_grad():
        torch.testing.assert_close(small(x, batch=_Batch(x), items=[{"drop": None}]), dead_twin(model, small)(x),
                                   atol=1e-6, rtol=1e-5)
    for call, said in (({"batch": _Batch(x, torch.tensor([3]))}, r"batch\.drop=None"),
                       ({"items": [{"drop": None}, {"drop": torch.tensor([3])}]}, r"1 item\(s\) in items")):
        with pytest.raises(graphprune.GraphpruneError, match=said):
            small(x, **call)


class _Settings(nn.Module):
    def forward(self, x, pick: Optional[int] = None, flag: Optional[bool] = None, mode: Optional[_Batch] = None):
        return x


def test_only_a_flag_or_an_enum_left_none_counts_as_checked():
    """The checks try a None-default int at 1 and other values: ``h[:, pick]`` at pick=2 was 0.70 off
    (survey 38 f01). A bool's two values, an enum's members are every value there is."""
    from graphprune.none_inputs import unchecked

    rules = unchecked(_Settings(), ((torch.zeros(1),), {}))
    assert ["none", ["pick"]] in rules and ["none", ["mode"]] in rules and ["none", ["flag"]] not in rules
