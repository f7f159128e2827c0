"""Smoke test of bench/tasks.py: one task, one seed, two methods at 50% FLOPs, a tiny training budget (seconds, CPU)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("torch_pruning")


def _bench():
    bench_dir = Path(__file__).parents[1] / "bench"
    sys.path.insert(0, str(bench_dir))  # tasks.py imports accuracy_digits from beside it
    spec = importlib.util.spec_from_file_location("tasks", bench_dir / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.full
def test_one_task_two_methods_meet_the_budget(one_thread, tmp_path):
    bench = _bench()
    out = tmp_path / "tasks.json"
    budget = bench.Budget(seeds=1, finetune_epochs=1)
    result = bench.run(["signal_1d"], [0], ["graphprune", "tp_magnitude"], budget, out, resume=False, train_epochs=2,
                        targets=(0.5,))
    rows = {r["method"]: r for r in result["rows"] if r["budget"] == 0.5}
    assert set(rows) == {"graphprune", "tp_magnitude"}
    for name, row in rows.items():
        assert "error" not in row, row.get("error")
        assert row["flops"] <= 0.5 + 1e-9, (name, row["flops"])
        assert 0.0 <= row["test_acc"] <= 1.0 and 0.0 <= row["test_acc_before_finetune"] <= 1.0
        assert row["params"] < 1.0, (name, row["params"])  # physically smaller
    assert "auto chose" in rows["graphprune"]["auto"]
    summary = json.loads(out.read_text())["summary"]["signal_1d"]
    assert summary["graphprune"]["0.5"]["per_seed"] == {"0": rows["graphprune"]["test_acc"]}
    assert 0.0 <= summary["unpruned"]["1.0"]["test_acc"]["mean"] <= 1.0
    # the paired comparison: one seed, so a difference and no interval
    (pair,) = json.loads(out.read_text())["paired"]
    assert (pair["task"], pair["budget"], pair["rival"], pair["seeds"]) == ("signal_1d", 0.5, "tp_magnitude", 1)
    assert pair["diff"] == pytest.approx(100 * (rows["graphprune"]["test_acc"] - rows["tp_magnitude"]["test_acc"]))
    assert pair["wins"] + pair["ties"] + pair["losses"] == 1 and pair["ci95"] is None
    assert "signal_1d | 0.5 | tp_magnitude" in bench.paired_table([pair])
    # --resume runs nothing twice
    again = bench.run(["signal_1d"], [0], ["graphprune", "tp_magnitude"], budget, out, resume=True, train_epochs=2,
                       targets=(0.5,))
    assert len(again["rows"]) == len(result["rows"])


def test_auto_oracle_summary_reads_pick_correlation_and_default():
    """bench/auto_oracle.py's summary on rows with known answers: a proxy that orders candidates exactly as the
    accuracy does correlates 1 and picks the best; one that orders them backwards correlates -1."""
    _bench()
    import auto_oracle

    rows = []
    for seed, sign in ((0, 1), (1, -1)):
        rows.append({"task": "t", "budget": 0.5, "seed": seed, "candidate": "default", "test_acc": 0.5})
        for i, acc in enumerate((0.9, 0.8, 0.7)):
            rows.append({"task": "t", "budget": 0.5, "seed": seed, "candidate": f"c/{i}", "test_acc": acc,
                         "proxy": sign * (i + 1.0)})
    s = auto_oracle.summarise(rows)["t@0.5"]
    assert s["seeds"] == 2 and s["default_mean"] == pytest.approx(0.5)
    assert s["proxy_pick_mean"] == pytest.approx((0.9 + 0.7) / 2)  # seed 0 picks the best, seed 1 the worst
    assert s["spearman"] == pytest.approx(0.0)  # +1 and -1 averaged
    assert s["best_candidate"] == "c/0" and s["best_mean"] == pytest.approx(0.9)
    assert "| t@0.5 | 50.00 | 80.00 | 90.00 (c/0) | 0.00 |" in auto_oracle.table({"t@0.5": s})
