import itertools
import warnings

import pytest
import torch
import torch.nn as nn

import graphprune
from models import IMAGE, Residual
from oracle import dead_twin


def test_bad_ratio():
    with pytest.raises(graphprune.GraphpruneError, match=r"ratio must be a number in \[0, 1\)"):
        graphprune.compile(Residual(), (torch.randn(*IMAGE),), ratio=1.0)


def test_bad_ignore():
    with pytest.raises(graphprune.GraphpruneError, match="not a submodule"):
        graphprune.compile(Residual(), (torch.randn(*IMAGE),), ratio=0.5, ignore=["nope"])


def test_example_inputs_must_be_a_tuple():
    with pytest.raises(graphprune.GraphpruneError, match="tuple"):
        graphprune.compile(Residual(), torch.randn(*IMAGE), ratio=0.5)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.fc(x)
        return x.nonzero()


def test_untraceable_model_names_the_problem():
    with pytest.raises(graphprune.GraphpruneError, match="cannot trace Untraceable"):
        graphprune.compile(Untraceable(), (torch.randn(2, 4),), ratio=0.5)


def test_ignore_keeps_output_width():
    model = Residual().eval()
    x = torch.randn(*IMAGE)
    small = graphprune.compile(model, (x,), ratio=0.5, ignore=["a"])
    assert small.a[-1].num_features == model.a[-1].num_features  # a's output (the residual) stays
    assert small.a[0][0].out_channels < model.a[0][0].out_channels  # its inside shrinks


def test_ignored_modules_next_to_each_other_both_keep_their_output_width():
    """An ignored module read only by another ignored module counted as inside "the ignored part":
    ignore=["l1", "l2"] pruned l1's output, which ignore=["l1"] alone kept (survey 24, resnet18's layer3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 32), nn.ReLU()),
                          nn.Sequential(nn.Linear(32, 32), nn.ReLU()), nn.Linear(32, 4)).eval()
    x = torch.randn(4, 8)
    for ignore in (["2"], ["2", "3"]):
        small = graphprune.compile(model, (x,), ratio=0.5, importance="l2", ignore=ignore)
        assert small[2][0].out_features == 32, ignore
        assert small[0].out_features < 32  # what no ignored module makes still goes
    assert small[3][0].out_features == 32


def test_round_to_cuts_no_group_the_ratio_leaves_whole():
    """round_to rounded every group's width down, also those a ratio of 0 or a pattern naming other
    modules leaves whole: ratio=0.0, round_to=16 pruned 15 convs of MobileNetV3 (survey 24)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 4)).eval()
    x = torch.randn(4, 8)
    same = graphprune.compile(model, (x,), ratio=0.0, round_to=16)
    assert [m.out_features for m in same if isinstance(m, nn.Linear)] == [30, 30, 4]
    one = graphprune.compile(model, (x,), ratio={"2": 0.5}, round_to=8)
    assert [m.out_features for m in one if isinstance(m, nn.Linear)] == [30, 8, 4]  # 15 kept, rounded down to 8


class _TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 24, 3, padding=1)
        self.c, self.fc = nn.Conv2d(40, 32, 1), nn.Linear(32, 5)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return self.fc(torch.relu(self.c(h)).mean((2, 3)))


@pytest.mark.parametrize("budget", [{"ratio": 0.5}, {"target_flops": 0.4}, {"target_flops": 0.7}])
def test_round_to_and_min_width_hold_on_every_branch_of_a_concatenation(budget):
    """round_to and min_width held for the concatenation's group, not for the convs that make it:
    branches of 16 and 24 channels came out at 5 and 11 for round_to=8, min_width=8 (survey 24)."""
    torch.manual_seed(0)
    model, x = _TwoBranches().eval(), torch.randn(2, 3, 16, 16)
    small = graphprune.compile(model, (x,), round_to=8, min_width=8, importance="l1", **budget)
    for name in ("a", "b", "c"):
        w = getattr(small, name).out_channels
        assert w % 8 == 0 and w >= 8, (name, w)
    assert small.a.out_channels + small.b.out_channels == small.c.in_channels
    if "target_flops" in budget:
        assert small.report.flops <= budget["target_flops"]


def test_a_params_budget_says_when_modules_it_never_runs_hold_many_parameters():
    """A module the forward never calls is outside a params budget (documented): the report said 0.50
    while the model returned held 0.96 of its parameters, and nothing warned (survey 24)."""
    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
            self.aux = nn.Linear(64, 400)  # never called

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    with pytest.warns(graphprune.GraphpruneWarning, match="aux never run"):
        small = graphprune.compile(WithAux().eval(), (torch.randn(4, 16),), target_params=0.5, importance="l2")
    assert small.report.params <= 0.5 and small.aux.weight.shape == (400, 64)


def test_module_names_fx_cannot_write_are_named_in_the_refusal():
    """ModuleDict keys like "conv-1" or "class" break fx's generated code (SyntaxError); the refusal
    said to make the forward traceable (survey 22). It names the keys to rename."""
    class OddNames(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleDict({"conv-1": nn.Linear(8, 24), "class": nn.Linear(24, 8)})

        def forward(self, x):
            return self.blocks["class"](torch.relu(self.blocks["conv-1"](x)))

    with pytest.raises(graphprune.GraphpruneError, match=r"Rename the submodules.*'blocks.conv-1', 'blocks.class'"):
        graphprune.compile(OddNames().eval(), (torch.randn(2, 8),), ratio=0.5)


def test_analyze_reports_groups_and_blocking_ops():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 16)
            self.b = nn.Linear(16, 16)
            self.c = nn.Linear(16, 4)

        def forward(self, x):
            h = torch.cumprod(self.a(x), dim=-1)  # no rule: blocks a's outputs
            return self.c(torch.relu(self.b(h)))

    a = graphprune.analyze(Odd(), (torch.randn(2, 8),))
    assert any("cumprod" in u for u in a.unsupported)
    prunable = {p.name for g in a.groups for p in g.params}
    assert "b.weight" in prunable and "a.weight" not in prunable
    assert "cumprod" in a.summary()


def test_pruned_model_is_independent_of_original():
    model = Residual().eval()
    x = torch.randn(*IMAGE)
    small = graphprune.compile(model, (x,), ratio=0.0)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(1.0)
    torch.testing.assert_close(graphprune.compile(model, (x,), ratio=0.0)(x), model(x))


def test_meta_parameters_analyze():
    with torch.device("meta"):
        model = Residual()
    a = graphprune.analyze(model, (torch.randn(*IMAGE),))
    assert len(a.groups) >= 3
    small = graphprune.compile(model, (torch.randn(*IMAGE),), ratio=0.5, importance="random")
    assert graphprune.count_params(small) < graphprune.count_params(model)


@pytest.mark.parametrize("budget", ["target_flops", "target_params"])
def test_meta_parameters_meet_a_budget_given_cpu_inputs(budget):
    """Weights on meta, example inputs on the CPU (what a user building a large model on
    meta writes): budgets are counted on shapes alone. The report once ran the
    original on the CPU inputs and ended in a bare RuntimeError."""
    with torch.device("meta"):
        model = Residual()
    x = torch.randn(*IMAGE)
    small = graphprune.compile(model, (x,), importance="random", **{budget: 0.5})
    assert all(t.is_meta for t in small.parameters())
    got = small.report.flops if budget == "target_flops" else small.report.params
    assert 0.45 <= got <= 0.5
    xm = torch.empty(*IMAGE, device="meta")
    assert small.report.flops == pytest.approx(graphprune.count_flops(small, (xm,)) / graphprune.count_flops(model, (xm,)))
    deploy = graphprune.compile(model, (x,), importance="random", pipeline="deploy", **{budget: 0.5})
    assert 0.45 <= (deploy.report.flops if budget == "target_flops" else deploy.report.params) <= 0.5
    with pytest.raises(graphprune.GraphpruneError, match="meta device"):
        graphprune.compile(model, (x,), importance="random", target_latency=0.5)


def test_user_pass_in_pipeline():
    calls = []

    @graphprune.register_pass("count-nodes-test")
    def count_nodes(gm):
        calls.append(len(gm.graph.nodes))
        return graphprune.PassResult(gm, False)

    graphprune.compile(Residual().eval(), (torch.randn(*IMAGE),), ratio=0.5, pipeline="shrink-params,count-nodes-test,dce")
    assert calls and calls[0] > 0


def test_broken_pass_is_named():
    @graphprune.register_pass("break-shapes-test")
    def break_shapes(gm):
        gm.stem[0].weight = nn.Parameter(torch.zeros(1, 1, 1, 1))
        return graphprune.PassResult(gm, True)

    from graphprune.pass_manager import run_pipeline
    from graphprune.trace import trace

    t = trace(Residual().eval(), (torch.randn(*IMAGE),))
    with pytest.raises(graphprune.GraphpruneError, match="pass 'break-shapes-test' left an invalid graph"):
        run_pipeline(t.gm, "dce,break-shapes-test")


def test_a_pass_that_changes_the_output_shape_is_named_with_both_shapes():
    """The message read the original shapes off the edited graph, whose new output node had none
    yet: "changed from [] to [(4, 3)]"."""
    @graphprune.register_pass("narrow-output-test")
    def narrow_output(gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        last = out.args[0]
        with gm.graph.inserting_before(out):
            cut = gm.graph.call_function(torch.narrow, (last, 1, 0, 3))
        out.args = (cut,)
        gm.recompile()
        return graphprune.PassResult(gm, True)

    with pytest.raises(graphprune.GraphpruneError, match=r"'narrow-output-test'.*changed from \[\(2, 10\)\] to \[\(2, 3\)\]"):
        graphprune.compile(Residual().eval(), (torch.randn(*IMAGE),), ratio=0.5, pipeline="shrink-params,narrow-output-test,dce")


def test_compile_keeps_train_eval_mode():
    x = torch.randn(*IMAGE)
    assert not graphprune.compile(Residual().eval(), (x,), ratio=0.5).training
    assert graphprune.compile(Residual().train(), (x,), ratio=0.5).training


class TwoPaths(nn.Module):
    """One module registered under two names (CoaT shares its position encoders this way)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.stem = nn.Conv2d(3, 8, 1)
        self.block = nn.Module()
        self.block.enc = self.enc
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.block.enc(x) + self.enc(x))


def test_module_under_two_names_is_not_mutated():
    torch.manual_seed(0)
    model = TwoPaths().eval()
    x = torch.randn(*IMAGE)
    with torch.no_grad():
        ref = model(x)
    small = graphprune.compile(model, (x,), ratio=0.5)
    graphprune.compile(model, (x,), target_flops=0.6)
    assert all(p.device.type == "cpu" for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)
        assert small(x).shape == ref.shape


@pytest.mark.parametrize("pipeline", ["default", "deploy"])
def test_a_latency_budget_lands_and_is_measured_on_the_pipelines_form(monkeypatch, pipeline):
    """target_latency with a deterministic stand-in for the clock (the FLOPs ratio): the
    bisection lands just under the target, and every candidate is timed in the form
    the pipeline gives (``deploy``: BatchNorms folded, as the user will run it)."""
    import graphprune.allocate

    has_bn = []

    def clock(model, reference, inputs, rounds=5):
        has_bn.append(any(isinstance(m, nn.BatchNorm2d) for m in model.modules()))
        return graphprune.count_flops(model, inputs) / graphprune.count_flops(reference, inputs)

    monkeypatch.setattr(graphprune.allocate, "latency_ratio", clock)
    # deploy's side-by-side choices (width multiple, layout, kernels) read no difference: unrounded widths,
    # whatever the machine's load (a real clock there chose multiples of 8 under load, and landed at 0.34)
    monkeypatch.setattr(graphprune.api, "latency_ratio", lambda model, reference, inputs, rounds=5: 1.0)
    x = torch.randn(*IMAGE)
    small = graphprune.compile(Residual().eval(), (x,), target_latency=0.5, importance="l1", pipeline=pipeline)
    assert 0.4 <= small.report.latency <= 0.5
    assert has_bn and set(has_bn) == {pipeline == "default"}
    assert (small.report.rounding is not None) == (pipeline == "deploy")  # deploy times the width multiples too


def test_a_latency_report_over_the_target_warns(monkeypatch):
    """The docstring promises the budget; a report that times the result over it (a busy
    machine) said nothing."""
    import graphprune.allocate

    def clock(model, reference, inputs, rounds=5):  # the search's clock: the FLOPs ratio
        return graphprune.count_flops(model, inputs) / graphprune.count_flops(reference, inputs)

    monkeypatch.setattr(graphprune.allocate, "latency_ratio", clock)
    monkeypatch.setattr(graphprune.api, "latency_ratio", lambda model, reference, inputs, rounds=5: 1.0)
    real_report = graphprune.allocate.report

    def slow_report(*a, **k):  # the report's timing reads 20% slow
        rep = real_report(*a, **k)
        rep.latency *= 1.2
        return rep

    monkeypatch.setattr(graphprune.api, "report", slow_report)
    with pytest.warns(graphprune.GraphpruneWarning, match="over target_latency=0.5"):
        small = graphprune.compile(Residual().eval(), (torch.randn(*IMAGE),), target_latency=0.5, importance="l1")
    assert small.report.latency > 0.5


def test_a_latency_reading_above_the_target_is_timed_again_and_corrected(monkeypatch):
    """A clock that reads 20% fast once (a lucky round) must not decide the result: the
    chosen candidate is timed again, and the median of its readings decides."""
    import graphprune.allocate

    readings = []

    def clock(model, reference, inputs, rounds=5):
        true = graphprune.count_flops(model, inputs) / graphprune.count_flops(reference, inputs)
        readings.append(true)
        return true * (0.8 if len(readings) == 3 else 1.0)  # the third reading is lucky

    monkeypatch.setattr(graphprune.allocate, "latency_ratio", clock)
    x = torch.randn(*IMAGE)
    small = graphprune.compile(Residual().eval(), (x,), target_latency=0.5, importance="l1")
    assert small.report.latency <= 0.5


def test_one_unlucky_latency_reading_does_not_move_the_choice(monkeypatch):
    """The model a steady clock chooses is read 30% slow the first time a noisy clock times
    it (a busy neighbour): the bisection rejects it on that reading, but the last pair
    is timed again until the medians agree, and the same model comes back (or a neighbour
    within the search's landing tolerance) instead of a smaller one that lands well under
    the target."""
    import graphprune.allocate

    def true(model, reference, inputs):
        return graphprune.count_flops(model, inputs) / graphprune.count_flops(reference, inputs)

    def steady(model, reference, inputs, rounds=5):
        return true(model, reference, inputs)

    model, x = Residual().eval(), torch.randn(*IMAGE)
    monkeypatch.setattr(graphprune.allocate, "latency_ratio", steady)
    want = graphprune.compile(model, (x,), target_latency=0.5, importance="l1").report.flops
    seen = []

    def noisy(model, reference, inputs, rounds=5):
        r = true(model, reference, inputs)
        unlucky = abs(r - want) < 1e-9 and want not in seen
        seen.append(r)
        return r * (1.3 if unlucky else 1.0)

    monkeypatch.setattr(graphprune.allocate, "latency_ratio", noisy)
    small = graphprune.compile(model, (x,), target_latency=0.5, importance="l1")
    assert any(abs(r - want) < 1e-9 for r in seen)  # the unlucky reading happened
    # the same model, or another the search may stop at: timed within LAND_TOL under the target (with the
    # suite's seed the search settles on a neighbour at 0.488 for 0.4999; 7 of 8 seeds give the same model)
    assert small.report.flops <= 0.5
    assert small.report.flops == pytest.approx(want) or small.report.flops >= 0.5 * (1 - graphprune.allocate.LAND_TOL)


def test_auto_under_a_latency_budget_times_two_searches_not_one_per_candidate(monkeypatch):
    """importance="auto" with calibration tries seven candidates; under target_latency they
    are compared at the FLOPs fraction one latency search lands on, and only the winner
    is searched by timing again: about twice the timings of a compile without
    calibration (one search), where a search per candidate took four times more."""
    import graphprune.allocate

    timings = []

    def clock(model, reference, inputs, rounds=5):
        timings.append(1)
        return graphprune.count_flops(model, inputs) / graphprune.count_flops(reference, inputs)

    monkeypatch.setattr(graphprune.allocate, "latency_ratio", clock)
    torch.manual_seed(0)
    model, x = Residual().eval(), torch.randn(*IMAGE)
    graphprune.compile(model, (x,), target_latency=0.5)
    one_search = len(timings)
    timings.clear()
    small = graphprune.compile(model, (x,), target_latency=0.5, calibration=[(torch.randn(*IMAGE),) for _ in range(8)])
    assert small.report.latency <= 0.5 and small.report.auto is not None
    assert "of the FLOPs" in small.report.auto.why
    assert len(timings) <= 2.5 * one_search


def test_a_latency_target_near_the_floor_warns(monkeypatch):
    """Latency that stops falling with FLOPs (a floor of 0.45 here, as depthwise nets have on CPU): a
    target within the floor's margin still lands, but warns that the widths are noise-chosen;
    a target well above the floor does not warn."""
    import warnings

    import graphprune.allocate

    def clock(model, reference, inputs, rounds=5):
        return 0.45 + 0.55 * graphprune.count_flops(model, inputs) / graphprune.count_flops(reference, inputs)

    monkeypatch.setattr(graphprune.allocate, "latency_ratio", clock)
    x = torch.randn(*IMAGE)
    with pytest.warns(graphprune.GraphpruneWarning, match="latency floor"):
        small = graphprune.compile(Residual().eval(), (x,), target_latency=0.5, importance="l1")
    assert small.report.latency <= 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error", graphprune.GraphpruneWarning)
        graphprune.compile(Residual().eval(), (x,), target_latency=0.8, importance="l1")


def test_deploy_times_no_rounding_that_lands_far_under_the_budget(monkeypatch):
    """A 48-wide layer in multiples of 16 lands at a third of the FLOPs for a half budget (32 is over),
    and that allocation timed fastest because it removed more: it was taken, and the
    budget missed by 0.17. A rounding that lands more than ROUNDING_SLACK under is not timed."""
    import graphprune.api

    def clock(model, reference, inputs, rounds=5):  # multiples of 16 run at half the time
        return 0.5 if all(m.out_features % 16 == 0 for m in list(model.modules())[:-1] if isinstance(m, nn.Linear)) else 1.0

    monkeypatch.setattr(graphprune.api, "latency_ratio", clock)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 4)).eval()
    small = graphprune.compile(model, (torch.randn(4, 16),), target_flops=0.5, importance="l1", pipeline="deploy")
    assert 0.5 - graphprune.api.ROUNDING_SLACK <= small.report.flops <= 0.5
    assert 16 not in (small.report.rounding or {}).get("latency_vs_unrounded", {})


def test_deploy_takes_the_width_multiple_that_times_fastest(monkeypatch):
    """pipeline="deploy" without round_to times each rounding's allocation against the
    unrounded one and keeps the fastest (here a clock that favours multiples of 8);
    the default pipeline and an explicit round_to never time anything."""
    import graphprune.api

    def clock(model, reference, inputs, rounds=5):  # multiples of 8 run at half the time
        widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
        return 0.5 if all(w % 8 == 0 for w in widths if w >= 8) else 1.0

    monkeypatch.setattr(graphprune.api, "latency_ratio", clock)
    x = torch.randn(*IMAGE)
    small = graphprune.compile(Residual().eval(), (x,), target_flops=0.35, importance="l1", pipeline="deploy")
    assert small.report.rounding["chosen"] == 8  # its landing, 0.341, is within ROUNDING_SLACK of the target
    assert all(m.out_channels % 8 == 0 for m in small.modules() if isinstance(m, nn.Conv2d) and m.out_channels >= 8)
    assert small.report.flops <= 0.35 and "multiples of 8" in str(small.report)
    for kw in ({"pipeline": None}, {"pipeline": "deploy", "round_to": 1}):
        assert graphprune.compile(Residual().eval(), (x,), target_flops=0.4, importance="l1", **kw).report.rounding is None


def test_ratio_honours_round_to_min_width_and_overrides():
    """ratio= took round_to, min_width and overrides and ignored them (the second survey)."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1)).eval(), torch.randn(2, 3, 8, 8)

    def width(**kw):
        return graphprune.compile(model, (x,), importance="l1", **kw)[0].out_channels

    assert width(ratio=0.25) == 12 and width(ratio=0.25, round_to=8) == 8
    assert width(ratio=0.5) == 8 and width(ratio=0.5, min_width=12) == 12
    assert width(ratio=0.5, overrides={"0": 0.0}) == 16 and width(ratio=0.5, overrides={"0": 0.25}) == 12


def test_round_to_and_min_width_count_channels_not_units():
    """round_to and min_width counted units: a head of 8 channels under round_to=8 kept 8 of 12 heads
    (ratio=0.25 asks for 9), min_width=32 kept every one of 4 heads of 16, and a grouped conv's
    unit (a channel in each of its 4 groups) was rounded to 8 units, 32 channels, where 48 is a
    multiple of 8 too."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=96, num_hidden_layers=1, num_attention_heads=12,
                                  intermediate_size=40, max_position_embeddings=16)
    torch.manual_seed(0)
    bert, ids = transformers.BertModel(cfg).eval(), torch.randint(0, 50, (2, 6))
    small = graphprune.compile(bert, (ids,), ratio=0.25, round_to=8, importance="l2")
    attention = small.encoder.layer[0].attention.self
    assert attention.query.out_features == 9 * 8 and attention.num_attention_heads == 9  # 9 heads of 8: multiples of 8
    assert small.encoder.layer[0].intermediate.dense.out_features == 24  # 30 channels: rounded down to 24
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=40, max_position_embeddings=16)
    bert = transformers.BertModel(cfg).eval()
    small = graphprune.compile(bert, (ids,), ratio=0.75, min_width=32, importance="l2")
    assert small.encoder.layer[0].attention.self.query.out_features == 32  # 2 heads of 16, not all 4

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv1d(4, 64, 3), nn.Conv1d(64, 64, 3, groups=4), nn.Conv1d(64, 2, 1)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    model, x = Grouped().eval(), torch.randn(2, 4, 20)
    small = graphprune.compile(model, (x,), ratio={"b": 0.25}, round_to=8, importance="l2")
    assert small.b.out_channels == 48 and small.c.in_channels == 48
    torch.testing.assert_close(small(x), dead_twin(model, small)(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", [0.7, 0.9])
def test_a_rounded_budget_keeps_the_ratios_overrides_fix(target):
    """Under round_to the fill that gives units back after the budget search gave them to groups
    whose ratio overrides fix: layer4.* at 0.5 came back at 512 and 496 of 512 channels. A target
    the overrides put out of reach lands under it with a warning that names them."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = graphprune.compile(model, (x,), target_flops=target, round_to=16, overrides={"layer4.*": 0.5},
                                   importance="l2", ignore=["fc"])
    for name in ("0.conv1", "0.conv2", "0.downsample.0", "1.conv1", "1.conv2"):
        assert small.get_submodule(f"layer4.{name}").out_channels == 256
    assert small.report.flops <= target
    said = [str(w.message) for w in caught if "overrides fix" in str(w.message)]
    assert bool(said) == (target == 0.9), said


def _narrow_then_wide(narrow: int) -> nn.Module:
    """A conv ``narrow`` channels wide, then one 32 wide: the narrow group is the one round_to holds."""
    return nn.Sequential(nn.Conv2d(3, narrow, 3, padding=1), nn.ReLU(), nn.Conv2d(narrow, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 4, 1)).eval()


def test_a_group_narrower_than_round_to_stays_whole_and_is_said():
    """A group narrower than round_to was cut without rounding (round_to=24: 16 channels came out at
    10, survey 26): no multiple of 24 fits under 16, so it stays whole, and compile says so."""
    torch.manual_seed(0)
    model, x = _narrow_then_wide(16), torch.randn(2, 3, 8, 8)
    with pytest.warns(graphprune.GraphpruneWarning, match="no wider than 24 channels stay whole"):
        small = graphprune.compile(model, (x,), ratio=0.4, round_to=24, importance="l2")
    assert small[0].out_channels == 16 and small[2].out_channels == 24


def test_a_group_one_multiple_wide_is_said_to_stay_whole():
    """Survey 42: a group exactly round_to wide cannot shrink either (a multiple under it is 0), and only
    the narrower ones were named; where it is the only group, the budget's error says round_to holds it."""
    torch.manual_seed(0)
    model, x = _narrow_then_wide(8), torch.randn(2, 3, 8, 8)
    with pytest.warns(graphprune.GraphpruneWarning, match="no wider than 8 channels stay whole"):
        small = graphprune.compile(model, (x,), ratio=0.5, round_to=8, importance="l2")
    assert small[0].out_channels == 8 and small[2].out_channels == 16
    alone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with pytest.raises(graphprune.GraphpruneError, match="round_to=8 keeps 1 of 1 prunable group"):
        graphprune.compile(alone, (x,), target_flops=0.9, round_to=8, importance="l2")


def test_round_to_holds_on_every_side_of_a_whole_group_unit():
    """A whole group of Conv2d(32, 48, groups=8) holds 4 input and 6 output channels: counted by the
    fewest, round_to=8 took units in twos and left 36 output channels (survey 28)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 48, 3, padding=1, groups=8), nn.ReLU(),
                          nn.Conv2d(48, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    small = graphprune.compile(model, (x,), ratio=0.25, round_to=8, importance="l2")
    assert small[2].in_channels % 8 == 0 and small[2].out_channels % 8 == 0, small[2]
    torch.testing.assert_close(small(x), dead_twin(model, small)(x), rtol=1e-5, atol=1e-6)


def _unrounded_said(seen) -> list:
    return [str(w.message) for w in seen if "does not hold" in str(w.message)]


def test_a_round_to_that_bundled_units_cannot_hold_is_said_and_only_then():
    """ShuffleNetV2's shuffles interleave halves of its branches, so a conv reads (and writes) channels of
    several branches, each rounded on its own; a branch of 12 kept whole beside one cut to 8 left widths like
    20 of 24 under round_to=8, in 18 convs, without a word (survey 28). The warning comes exactly where a
    pruned dim is off the multiple."""
    import torchvision

    torch.manual_seed(0)
    model, x = torchvision.models.shufflenet_v2_x0_5().eval(), torch.randn(1, 3, 32, 32)
    mods = dict(model.named_modules())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        small = graphprune.compile(model, (x,), ratio=0.3, round_to=8, importance="bn_scale")
    off = [n for n, c in small.named_modules() if isinstance(c, nn.Conv2d) and c.out_channels != mods[n].out_channels
           and c.out_channels % 8]
    said = _unrounded_said(seen)
    assert bool(off) == bool(said), (off, said)
    assert not said or "branches a concatenation or a shuffle makes" in said[0]
    # a conv writing branches of 3 kept whole beside multiples: 11 convs off at 64 px, and not a word
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        small = graphprune.compile(model, (torch.randn(1, 3, 64, 64),), target_flops=0.5, round_to=8, importance="l1")
    off = [n for n, c in small.named_modules() if isinstance(c, nn.Conv2d) and c.out_channels != mods[n].out_channels
           and c.out_channels % 8]
    assert off and _unrounded_said(seen), off
    for budget in ({"ratio": 0.5}, {"target_flops": 0.4}):  # branches of a concatenation hold it: nothing to say
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            graphprune.compile(_TwoBranches().eval(), (torch.randn(2, 3, 16, 16),), round_to=8, importance="l1", **budget)
        assert not _unrounded_said(seen)


class _Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 4, 1)

    def forward(self, x, mask):
        return self.b(torch.relu(self.a(x)) * mask)


def test_deploy_times_a_forward_that_needs_keyword_inputs():
    """pipeline="deploy" timed its candidates without example_kwargs: a required keyword input
    raised a bare TypeError (survey 28)."""
    torch.manual_seed(0)
    model, x = _Gated().eval(), torch.randn(2, 3, 8, 8)
    small = graphprune.compile(model, (x,), example_kwargs={"mask": torch.rand(2, 1, 8, 8)}, target_flops=0.5,
                               pipeline="deploy", importance="l2")
    assert small.report.flops <= 0.5


def test_a_float64_model_prunes_in_float64():
    """The weight-norm criteria reduced with a float32 accumulator, which torch refuses for
    float64 weights (a bare RuntimeError from every budget and from l1/l2)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1)).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for kw in ({"ratio": 0.25, "importance": "l1"}, {"ratio": 0.25, "importance": "l2"}, {"target_flops": 0.5}):
        small = graphprune.compile(model, (x,), **kw)
        assert next(small.parameters()).dtype == torch.float64 and small(x).dtype == torch.float64
    same = graphprune.compile(model, (x,), ratio=0.0)
    torch.testing.assert_close(same(x), model(x), rtol=0, atol=0)


def test_a_ratio_pattern_that_names_nothing_prunable_warns():
    """ratio={"nomatch*": 0.5} pruned nothing, and said nothing (the second survey)."""
    model, x = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1)).eval(), torch.randn(2, 3, 8, 8)
    with pytest.warns(graphprune.GraphpruneWarning, match=r"ratio pattern\(s\) \['nomatch\*'\] name no module"):
        graphprune.compile(model, (x,), ratio={"nomatch*": 0.5, "0": 0.5}, importance="l1")
    with pytest.warns(graphprune.GraphpruneWarning, match=r"overrides pattern\(s\) \['nope'\]"):
        graphprune.compile(model, (x,), target_flops=0.6, overrides={"nope": 0.5}, importance="l1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", graphprune.GraphpruneWarning)
        assert graphprune.compile(model, (x,), ratio={"0": 0.5}, importance="l1")[0].out_channels == 8


def test_a_pruned_graph_carries_no_counts_of_its_original():
    """The budget search caches the traced original's FLOPs and parameters on its graph;
    shrink-params copied them into the result, where they describe another model."""
    from graphprune.meta_keys import CACHED

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3)).eval()
    x = torch.randn(2, 3, 12, 12)
    for budget in ({"target_flops": 0.5}, {"target_params": 0.5}):
        small = graphprune.compile(model, (x,), output="graph", **budget)
        assert not set(CACHED) & set(small.meta), budget


def test_calibration_given_as_a_generator_is_read_as_often_as_a_list():
    """Scoring used up a generator and the refit then saw no data: a singular solve
    (``_LinAlgError``) under a budget, a silently unfitted layer under a ratio."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1)
            self.c = torch.nn.Conv2d(16, 8, 1)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.c(torch.relu(self.b(h)) + h)

    torch.manual_seed(0)
    m, x = Net().eval(), torch.randn(2, 3, 8, 8)
    batches = [(torch.randn(4, 3, 8, 8),) for _ in range(4)]
    for budget in ({"target_flops": 0.5}, {"ratio": 0.5}):
        kw = dict(importance="activation", reconstruct=True, **budget)
        listed = graphprune.compile(m, (x,), calibration=list(batches), **kw)
        generated = graphprune.compile(m, (x,), calibration=(b for b in batches), **kw)
        for (k, v), (_, w) in zip(listed.state_dict().items(), generated.state_dict().items()):
            assert torch.equal(v, w), (budget, k)


def test_torchscript_inside_is_refused_by_name_and_torch_compile_is_unwrapped():
    """A scripted block crashed the copy with a bare RuntimeError; a torch.compile'd model
    was refused with "'Net' object has no attribute 'b'"."""
    class Net(torch.nn.Module):
        def __init__(self, mid):
            super().__init__()
            self.a, self.mid, self.b = torch.nn.Conv2d(3, 16, 3, padding=1), mid, torch.nn.Conv2d(16, 8, 1)

        def forward(self, x):
            return self.b(self.mid(torch.relu(self.a(x))))

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    scripted = Net(torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU()))).eval()
    for call in (lambda: graphprune.analyze(scripted, (x,)), lambda: graphprune.compile(scripted, (x,), ratio=0.5)):
        with pytest.raises(graphprune.GraphpruneError, match="mid is a TorchScript module"):
            call()
    plain = Net(torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU())).eval()
    wrapped = torch.compile(plain, backend="eager")
    small = graphprune.compile(wrapped, (x,), ratio=0.5)
    reference = graphprune.compile(plain, (x,), ratio=0.5)
    assert type(small) is Net and small.report.form == "module"
    with torch.no_grad():
        assert torch.equal(small(x), reference(x))
    inner = Net(torch.compile(torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1)), backend="eager")).eval()
    with pytest.raises(graphprune.GraphpruneError, match=r"mid is wrapped by torch.compile.*mid._orig_mod"):
        graphprune.compile(inner, (x,), ratio=0.5)


class _NormalisesInPlace(torch.nn.Module):
    """YOLOv5's ``im = im.float(); im /= 255``: a forward that writes into its input."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, im):
        im = im.float()
        im /= 255
        return self.b(torch.relu(self.a(im)))


def test_a_forward_that_writes_into_its_input_changes_no_caller_tensor():
    """Every check ran on the caller's example: it was divided by 255 again each time, and
    the model and its graph, given different inputs, were refused as different."""
    torch.manual_seed(0)
    m = _NormalisesInPlace().eval()
    x = torch.rand(2, 3, 8, 8) * 255
    cal = [(torch.rand(2, 3, 8, 8) * 255,) for _ in range(4)]
    x0, cal0 = x.clone(), [c[0].clone() for c in cal]
    small = graphprune.compile(m, (x,), target_flops=0.5, calibration=cal)
    assert torch.equal(x, x0) and all(torch.equal(c[0], c0) for c, c0 in zip(cal, cal0))
    assert small.report.verify.status == "passed" and small.report.flops <= 0.5
    graphprune.count_flops(m, (x,))
    assert torch.equal(x, x0)


def test_the_self_check_grows_inputs_given_in_a_list():
    """An input passed as ``[x]`` was checked at the example alone (``passed on inputs [[], []]``)."""
    class Listed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 32), torch.nn.Linear(32, 4)

        def forward(self, inp):
            return self.b(torch.relu(self.a(inp[0])))

    torch.manual_seed(0)
    small = graphprune.compile(Listed().eval(), ([torch.randn(2, 8)],), ratio=0.5)
    assert small.report.verify.inputs[:2] == [[(2, 8)], [(3, 8)]]


def test_a_parameter_the_forward_never_reads_is_outside_the_reported_params():
    """Dinov2's mask_token, read only when a mask is passed: the budget left it out, the report
    counted it, and target_params=0.5 was reported at 0.50009 (the module form refused as over)."""
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.Conv2d(32, 8, 3, padding=1)
            self.mask_token = torch.nn.Parameter(torch.zeros(1, 3, 8, 8))

        def forward(self, x, mask=None):
            if mask is not None:
                x = torch.where(mask, self.mask_token, x)
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    m, x = Masked().eval(), torch.randn(2, 3, 8, 8)
    for output in ("auto", "graph"):
        small = graphprune.compile(m, (x,), target_params=0.5, output=output)
        read = graphprune.count_params(small) - small.mask_token.numel()
        assert small.report.params <= 0.5 and small.report.params == read / (graphprune.count_params(m) - 192)
        assert small.report.form == ("module" if output == "auto" else "graph"), small.report.form_why


def test_a_graph_form_result_of_a_long_graph_deep_copies():
    """Node meta held descriptions that refer to their nodes (COp, NumberUse): copy.deepcopy
    walked the node list through them and hit the recursion limit (LRASPP, DaViT)."""
    import copy

    torch.manual_seed(0)
    layers = [m for _ in range(200) for m in (torch.nn.Linear(8, 8), torch.nn.ReLU())]

    class Long(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(*layers)

        def forward(self, x):
            h = self.body(x)
            return h / h.shape[1]

    m, x = Long().eval(), torch.randn(2, 8)
    small = graphprune.compile(m, (x,), ratio=0.25, output="graph")
    twin = copy.deepcopy(small)
    with torch.no_grad():
        assert torch.equal(twin(x), small(x))


def test_a_deploy_params_budget_counts_top_level_parameters_and_drops_folded_scales():
    """Under pipeline='deploy' candidates are counted on meta, where a top-level parameter
    (a ViT's pos_embed) became a buffer and went uncounted; a folded layer scale stayed in
    the result, unread. CaiT at target_params=0.5 came back at 0.5012."""
    class Tokens(torch.nn.Module):
        def __init__(self, n=16, d=32):
            super().__init__()
            self.embed, self.pos = torch.nn.Linear(8, d), torch.nn.Parameter(torch.randn(1, n, d))
            self.norm, self.fc1, self.fc2 = torch.nn.LayerNorm(d), torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
            self.gamma, self.head = torch.nn.Parameter(torch.rand(d)), torch.nn.Linear(d, 4)

        def forward(self, x):                                               # (B, 16, 8)
            h = self.embed(x) + self.pos
            h = h + self.gamma * self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(h))))
            return self.head(h.mean(1))

    torch.manual_seed(0)
    m, x = Tokens().eval(), torch.randn(2, 16, 8)
    small = graphprune.compile(m, (x,), target_params=0.5, pipeline="deploy", round_to=1)
    names = [n for n, _ in small.named_parameters()]
    assert "gamma" not in names and "pos" in names
    assert small.report.params <= 0.5 and small.report.params == graphprune.count_params(small) / graphprune.count_params(m)


def test_arguments_that_mean_nothing_are_refused():
    """round_to=0 or -8 and min_width=0 were taken silently; a non-module raised AttributeError and
    an uninitialised lazy module a bare ValueError."""
    m, x = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1)), torch.randn(1, 3, 8, 8)
    for kw, what in (({"round_to": 0}, "round_to"), ({"round_to": -8}, "round_to"), ({"round_to": 2.5}, "round_to"),
                     ({"min_width": 0}, "min_width")):
        with pytest.raises(graphprune.GraphpruneError, match=what):
            graphprune.compile(m, (x,), target_flops=0.5, **kw)
    with pytest.raises(graphprune.GraphpruneError, match="expected a torch.nn.Module"):
        graphprune.compile(lambda t: t, (x,), ratio=0.5)
    lazy = torch.nn.Sequential(torch.nn.LazyConv2d(8, 3), torch.nn.ReLU(), torch.nn.LazyConv2d(4, 1))
    with pytest.raises(graphprune.GraphpruneError, match="has not made its parameters yet"):
        graphprune.compile(lazy, (x,), ratio=0.5)
    lazy(x)
    assert graphprune.count_params(graphprune.compile(lazy, (x,), ratio=0.5)) < graphprune.count_params(lazy)


@pytest.mark.parametrize("kw,match", [
    ({"target_params": "a"}, "target_params must be a fraction"),
    ({"target_flops": 1.5}, "target_flops must be a fraction"),
    ({"ratio": 0.5, "overrides": {"layer1*": 5}}, r"overrides\['layer1\*'\] must be the fraction"),
    ({"target_flops": 0.5, "overrides": {"layer1*": -1}}, r"overrides\['layer1\*'\] must be the fraction"),
    ({"ratio": 0.5, "verify": "no"}, "verify must be True or False"),
    ({"ratio": 0.5, "calibration": 5}, "calibration must be an iterable of batches"),
    ({"ratio": True}, "ratio must be a number"),
])
def test_bad_arguments_fail_early_and_clearly(kw, match):
    """Arguments that reached deep code as raw TypeErrors (``target_params="a"``, ``calibration=5``),
    or were taken silently (an override of 5 collapsed its groups to one unit and missed the
    budget by 0.48; ``verify="no"`` is truthy)."""
    with pytest.raises(graphprune.GraphpruneError, match=match):
        graphprune.compile(Residual().eval(), (torch.randn(*IMAGE),), **kw)


def test_one_batch_given_bare_as_calibration_is_refused_by_every_entry_point():
    """A dict of keyword inputs given as ``calibration`` was iterated for its keys: the batches were the
    strings "x", and every entry point failed somewhere deep, or took a tensor's rows as batches."""
    model, x = Residual().eval(), torch.randn(*IMAGE)
    for bare in ({"x": x}, x):
        for run in (lambda: graphprune.compile(model, (x,), target_flops=0.5, calibration=bare),
                    lambda: graphprune.prune_iteratively(model, (x,), target_flops=0.5, steps=2, calibration=bare,
                                                         progress=False),
                    lambda: graphprune.search(model, (x,), lambda m: 0.0, target_flops=0.5, trials=2, progress=False,
                                              calibration=bare)):
            with pytest.raises(graphprune.GraphpruneError, match=r"got one (dict|Tensor): pass a list of batches"):
                run()


def test_ignore_may_name_one_module_as_a_string():
    """``ignore="head"`` was read character by character ("ignore entry 'h' is not a submodule")."""
    model, x = Residual().eval(), torch.randn(*IMAGE)
    one = graphprune.compile(model, (x,), ratio=0.5, ignore="head", importance="l1")
    listed = graphprune.compile(model, (x,), ratio=0.5, ignore=["head"], importance="l1")
    assert graphprune.count_params(one) == graphprune.count_params(listed)


def test_no_budget_warns_that_nothing_is_removed():
    model, x = Residual().eval(), torch.randn(*IMAGE)
    with pytest.warns(graphprune.GraphpruneWarning, match="no ratio or target given"):
        small = graphprune.compile(model, (x,))
    assert graphprune.count_params(small) == graphprune.count_params(model)


@pytest.mark.parametrize("scores,match", [(lambda g: None, r"shape \(\)"), (lambda g: torch.ones(3), r"shape \(3,\)"),
                                          (lambda g: torch.full((g.n_units,), float("nan")), "non-finite"),
                                          (lambda g: torch.ones(g.n_units, 2), "shape")])
def test_a_registered_criterion_must_score_every_unit(scores, match):
    """A registered criterion returning None or the wrong length was taken as given: ratio=0.5
    removed one to three units per group, silently."""
    name = f"bad_{abs(hash(match))}"
    graphprune.importance._IMPORTANCE.pop(name, None)
    graphprune.register_importance(name)(lambda group, tensors, **_: scores(group))
    with pytest.raises(graphprune.GraphpruneError, match=match):
        graphprune.compile(Residual().eval(), (torch.randn(*IMAGE),), ratio=0.5, importance=name)


def test_a_built_in_criterion_cannot_be_replaced():
    with pytest.raises(graphprune.GraphpruneError, match="'l2' is built in"):
        graphprune.register_importance("l2")


@pytest.mark.parametrize("name", ["code", "graph", "meta", "recompile"])
def test_a_submodule_named_like_a_graph_module_attribute_is_refused_clearly(name):
    """A top-level submodule called ``code`` collides with the traced GraphModule's own attribute:
    both tracers failed ("references nonexistent attribute weight of code") and the refusal
    told the user to make the forward traceable. Wrapped in a parent module, it prunes."""
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.out = nn.Linear(8, 16), nn.Linear(16, 4)
            setattr(self, name, nn.Linear(16, 16))

        def forward(self, x):
            return self.out(torch.relu(getattr(self, name)(torch.relu(self.inp(x)))))

    model, x = Named().eval(), torch.randn(3, 8)
    with pytest.raises(graphprune.GraphpruneError, match=f"top-level attributes named \\['{name}'\\]"):
        graphprune.compile(model, (x,), ratio=0.5)
    small = graphprune.compile(nn.Sequential(model), (x,), ratio=0.5, importance="l1")
    assert graphprune.count_params(small) < graphprune.count_params(model)


@pytest.mark.parametrize("kw,match", [
    ({"importance": "taylor", "loss_fn": lambda out, batch: out}, r"loss_fn returned shape \(2, 10\)"),
    ({"importance": "activation", "calibration": [(torch.randn(2, 3, 16),)]}, "failed on the calibration data"),
])
def test_calibration_mistakes_are_named(kw, match):
    """A non-scalar loss and a batch the model does not take escaped as raw autograd and conv errors."""
    x = torch.randn(*IMAGE)
    with pytest.raises(graphprune.GraphpruneError, match=match):
        graphprune.compile(Residual().eval(), (x,), ratio=0.5, **{"calibration": [(x,)], **kw})


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return [k for k in before if not torch.equal(before[k], after[k])]


@pytest.mark.parametrize("calibration", [[], "used-up generator"])
@pytest.mark.parametrize("kw", [{"importance": "taylor"}, {"importance": "auto"}, {"reconstruct": True, "importance": "l2"}])
def test_calibration_with_no_batches_is_refused(calibration, kw):
    """An empty list, or a generator an earlier call used up, was taken as data: taylor scored every unit 0
    and kept the top half by index, auto judged on no batches and reported an error of 0, and the refit
    raised torch's LinAlgError (survey 15)."""
    torch.manual_seed(0)
    model, x = Residual().eval(), torch.randn(*IMAGE)
    if calibration != []:
        calibration = ((torch.randn(*IMAGE),) for _ in range(2))
        list(calibration)
    with pytest.raises(graphprune.GraphpruneError, match="calibration holds no batches"):
        graphprune.compile(model, (x,), ratio=0.5, calibration=calibration, **kw)


def test_prune_iteratively_at_a_target_of_one_fine_tunes_a_copy():
    """With nothing to prune, the loop recalibrated BatchNorm and ran ``finetune`` on the user's own model,
    and returned it (survey 15: every tensor changed)."""
    torch.manual_seed(0)
    model, x = Residual().train(), torch.randn(*IMAGE)
    before = _state(model)

    def finetune(m):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1.0)

    out = graphprune.prune_iteratively(model, (x,), target_flops=1.0, steps=1, finetune=finetune,
                                       calibration=[(torch.randn(*IMAGE),) for _ in range(2)], progress=False)
    assert out is not model and model.training and not _unchanged(model, before)
    assert torch.equal(next(out.parameters()), next(model.parameters()) + 1.0)


def test_sensitivity_never_hands_the_users_model_to_evaluate():
    """The baseline was ``evaluate(model)`` on the user's own object; an evaluate that recalibrates BatchNorm
    before scoring (as it must for the pruned candidates) rewrote the user's running statistics."""
    torch.manual_seed(0)
    model, x = Residual().eval(), torch.randn(*IMAGE)
    before = _state(model)
    seen = []

    def evaluate(m):
        seen.append(m)
        m.train()
        with torch.no_grad():
            m(torch.randn(*IMAGE) * 3 + 1)
        m.eval()
        return 0.0

    graphprune.sensitivity(model, (x,), evaluate, levels=(0.5,), progress=False)
    assert not any(m is model for m in seen) and not _unchanged(model, before)


class _Stateful(nn.Module):
    """A forward that updates tensors held as plain attributes, not buffers: a call counter and an EMA."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 4)
        self.calls, self.ema = torch.zeros(()), torch.zeros(8)

    def forward(self, x):
        self.calls.add_(1)
        self.ema.mul_(0.9).add_(0.1 * x.mean(0))
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("verify", [False, True])
def test_compile_leaves_the_users_plain_tensor_state_alone(verify):
    """Tracing and the self-check ran the user's forward on its own plain tensor attributes: the counter
    went 0 -> 6 and the EMA moved by 0.27 (survey 16)."""
    torch.manual_seed(0)
    model = _Stateful().eval()
    graphprune.compile(model, (torch.randn(4, 8),), ratio=0.5, importance="l2", verify=verify)
    assert float(model.calls) == 0.0 and not model.ema.any()


class _Masked(nn.Module):
    """Traced by torch.export (``is_tensor`` defeats symbolic tracing), with a keyword-only mask."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x, *, mask=None):
        h = torch.relu(self.a(x))
        if torch.is_tensor(h):
            h = h + 0.1
        return self.c(torch.relu(self.b(h if mask is None else h * mask)))


def test_taylor_takes_keyword_batches_for_an_exported_graph():
    """Batches naming the positional input by keyword reached the exported graph's gradient run as
    they were: 'keyword mismatch', while activation and auto took them (survey 18)."""
    torch.manual_seed(0)
    x, mask = torch.randn(16, 8), torch.rand(16, 32)
    calib = [{"x": x[i:i + 4], "mask": mask[i:i + 4]} for i in range(0, 16, 4)]
    small = graphprune.compile(_Masked().eval(), (x[:2],), example_kwargs={"mask": mask[:2]}, ratio=0.5,
                               importance="taylor", calibration=calib, loss_fn=lambda out, batch: out.pow(2).mean())
    assert graphprune.count_params(small) < graphprune.count_params(_Masked())


def test_a_keyword_example_tensor_stale_in_calibration_is_named():
    """The example's mask (2 samples) went with every batch of 4; the error blamed dims torch.export
    fixed, which the batches had right (survey 18). It now names the keyword and the remedy."""
    torch.manual_seed(0)
    x, mask = torch.randn(16, 8), torch.rand(16, 32)
    with pytest.raises(graphprune.GraphpruneError, match=r"example_kwargs \['mask'\] .* hold 2 samples where this batch has 4"):
        graphprune.compile(_Masked().eval(), (x[:2],), example_kwargs={"mask": mask[:2]}, ratio=0.5,
                           importance="activation", calibration=[(x[i:i + 4],) for i in range(0, 16, 4)])


class _WarmsUp(nn.Module):
    """A forward that counts its calls in a plain int and behaves otherwise after two."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = torch.relu(self.a(x))
        return self.b(h * 0.5 if self.calls > 2 else h)


def test_the_result_starts_where_the_users_model_is():
    """The checks ran the result twice and left its counter at 2, so its first user call took the
    warmed-up path: 0.15 off at ratio 0 (survey 18). What a run rebinds is put back."""
    torch.manual_seed(0)
    model, x = _WarmsUp().eval(), torch.randn(4, 8)
    small = graphprune.compile(model, (x,), ratio=0.0)
    assert small.report.form == "module" and small.calls == 0 and model.calls == 0
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(small(x), model(x), rtol=0, atol=0)


class _InitOnce(nn.Module):
    """ActNorm-style: the first call sets a scale from its batch, guarded by a buffer flag."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 4)
        self.register_buffer("inited", torch.tensor(False))
        self.register_buffer("scale", torch.ones(32))

    def forward(self, x):
        h = torch.relu(self.a(x))
        if not self.inited:
            self.scale.copy_(1.0 / (h.std(0) + 1e-3))
            self.inited.fill_(True)
        return self.b(h * self.scale)


def test_a_first_call_initialisation_is_not_traced_as_every_call():
    """The trace took the initialising branch for good: its result recomputed the scale from every
    batch, 0.25 off from the second call on, with verify passed (survey 18). The trace check calls
    both twice when the first call wrote state, and refuses with the remedy; after one call it prunes."""
    torch.manual_seed(0)
    model, x = _InitOnce().eval(), torch.randn(4, 8)
    with pytest.raises(graphprune.GraphpruneError, match="on a second call.*call the model once before compile"):
        graphprune.compile(model, (x,), ratio=0.0)
    assert not model.inited
    with torch.no_grad():
        model(x)
        small = graphprune.compile(model, (x,), ratio=0.0)
        for _ in range(3):
            xb = torch.randn(4, 8)
            torch.testing.assert_close(small(xb), model(xb), rtol=0, atol=0)


class _AliasedWrite(nn.Module):
    """``v = h; h += 1``: symbolic tracing records the write out of place, so ``v`` misses it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x):
        h = self.a(x)
        v = h
        h += 1.0
        return self.b(torch.relu(h)) + v.sum(1, keepdim=True)


def test_without_verify_a_trace_found_wrong_is_refused():
    """With verify=False the graph came back 16 off at ratio 0 although the module form had
    disagreed with it (survey 16 r7, survey 18): a disagreement now runs the trace check, which refuses it."""
    torch.manual_seed(0)
    model, x = _AliasedWrite().eval(), torch.randn(4, 8)
    with pytest.raises(graphprune.GraphpruneError, match="does not compute what _AliasedWrite computes"):
        graphprune.compile(model, (x,), ratio=0.0, verify=False)
    small = graphprune.compile(model, (x,), ratio=0.0)  # the checked path retraces it with torch.export
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=0)


def test_a_streaming_dataloader_is_calibration():
    """A DataLoader over an IterableDataset has ``__len__`` and raises in it: the check for empty calibration
    turned every such loader into a TypeError (survey 17)."""
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            return iter([torch.randn(*IMAGE[1:], generator=g) for _ in range(6)])

    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(Stream(), batch_size=2)
    small = graphprune.compile(Residual().eval(), (torch.randn(*IMAGE),), ratio=0.5, importance="activation",
                               calibration=loader)
    assert small.report.form == "module"


@pytest.mark.parametrize("how", ["generator", "loader"])
def test_an_endless_stream_is_read_to_a_cap(how):
    """``list(calibration)`` on ``while True: yield batch`` never returned, memory growing (survey 18);
    a training loader was read to its end. A stream gives its first CALIBRATION_CAP batches, and
    says so; the same batches as a list give the same model."""
    from graphprune.batches import CALIBRATION_CAP

    def endless():
        g = torch.Generator().manual_seed(0)
        while True:
            yield (torch.randn(2, 8, generator=g),)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(2 * CALIBRATION_CAP + 6, 8, generator=g))
    make = {"generator": endless, "loader": lambda: torch.utils.data.DataLoader(data, batch_size=2)}[how]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    with pytest.warns(graphprune.GraphpruneWarning, match=f"read the first {CALIBRATION_CAP}") as caught:
        small = graphprune.compile(model, (torch.randn(2, 8),), ratio=0.5, importance="activation", calibration=make())
    # the warning points at the line that called compile, not into graphprune (or the wrapper around compile)
    assert {w.filename for w in caught if w.category is graphprune.GraphpruneWarning} == {__file__}
    first = list(itertools.islice(iter(make()), CALIBRATION_CAP))
    same = graphprune.compile(model, (torch.randn(2, 8),), ratio=0.5, importance="activation", calibration=first)
    torch.testing.assert_close(small[0].weight, same[0].weight, rtol=0, atol=0)


def _labelled_loader(n=12, batch=4):
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(n, *IMAGE[1:], generator=g), torch.randint(0, 10, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch)  # batches are [x, y] lists


def test_a_labelled_loader_is_calibration():
    """``(x, y)`` batches from a DataLoader, the loader users have: the model was called with
    ``(x, y)`` and compile refused them (forward() takes 2 positional arguments but 3 were given).
    The items past what the forward takes are targets: the model gets ``x``, ``loss_fn`` the whole
    batch, so Taylor can score with the labels; ``auto`` on the labelled loader decides as on the
    inputs alone."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model, x = Residual().eval(), torch.randn(*IMAGE)
    loader = _labelled_loader()
    small = graphprune.compile(model, (x,), target_flops=0.5, calibration=loader)
    alone = graphprune.compile(model, (x,), target_flops=0.5, calibration=[xb for xb, _ in loader])
    assert str(small.report.auto).split(" candidates in")[0] == str(alone.report.auto).split(" candidates in")[0]
    for a, b in zip(small.state_dict().values(), alone.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    by_pair = graphprune.compile(model, (x,), ratio=0.5, importance="taylor", calibration=loader,
                                 loss_fn=lambda out, b: F.cross_entropy(out, b[1]))
    kept = [(xb,) for xb, _ in loader]
    labels = {xb[0].data_ptr(): yb for xb, (_, yb) in zip(kept, loader)}
    by_lookup = graphprune.compile(model, (x,), ratio=0.5, importance="taylor", calibration=kept,
                                   loss_fn=lambda out, b: F.cross_entropy(out, labels[b[0].data_ptr()]))
    for a, b in zip(by_pair.state_dict().values(), by_lookup.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    flipped = graphprune.compile(model, (x,), ratio=0.5, importance="taylor", calibration=loader,
                                 loss_fn=lambda out, b: F.cross_entropy(out, 9 - b[1]))
    assert any(not torch.equal(a, b) for a, b in zip(by_pair.state_dict().values(), flipped.state_dict().values()))


def test_a_labelled_loader_feeds_the_helpers():
    """``recalibrate_bn``, ``distill`` and ``prune_iteratively`` take the same loader: the targets are not inputs."""
    torch.manual_seed(0)
    model, x = Residual().eval(), torch.randn(*IMAGE)
    loader = _labelled_loader()
    small = graphprune.prune_iteratively(model, (x,), target_flops=0.5, steps=2, calibration=loader, progress=False)
    inputs = [(xb,) for xb, _ in loader]
    twin = graphprune.compile(model, (x,), target_flops=0.5, calibration=inputs)
    graphprune.recalibrate_bn(twin, inputs)
    again = graphprune.compile(model, (x,), target_flops=0.5, calibration=loader)
    graphprune.recalibrate_bn(again, loader)
    for a, b in zip(again.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    graphprune.distill(small, model, loader, steps=2, progress=False)
    assert small.distill_report["steps"] == 2
    assert graphprune.distill_loss(small, model, loader) >= 0


@pytest.mark.parametrize("budget", ["target_flops", "target_latency", "auto"])
def test_budgets_leave_the_users_and_the_results_plain_tensor_state_alone(budget):
    """A latency budget timed the user's model and each candidate on their own state: the user's counter
    went 0 -> 140 and the result's stood at 120 (the timing runs). Every run compile makes, timing too,
    is on copies: both keep the state the user's model had."""
    torch.manual_seed(0)
    model, x = _Stateful().eval(), torch.randn(64, 8)
    kw = {"target_flops": dict(target_flops=0.5, importance="l2"),
          "target_latency": dict(target_latency=0.9, importance="l2"),
          "auto": dict(target_flops=0.5, calibration=[(torch.randn(16, 8),) for _ in range(4)])}[budget]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a latency target near the floor of so small a model warns
        small = graphprune.compile(model, (x,), **kw)
    assert float(model.calls) == 0.0 and not model.ema.any()
    assert float(small.calls) == 0.0 and not small.ema.any()
