"""bench/kernels.py runs end to end on tiny shapes (under the interpreter on a CPU)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"
KEYS = {"device", "dtype", "M", "N", "K", "block", "sparsity", "dense_ms", "torch_bsr_ms", "graphprune_ms"}


@pytest.mark.full
def test_cpu_smoke_writes_results(tmp_path):
    run = subprocess.run([sys.executable, str(BENCH), "--cpu-smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    records = json.loads((tmp_path / "kernels-cpu-interpreter.json").read_text())
    assert len(records) == 16
    for record in records:
        assert KEYS <= set(record), record
        assert "error" not in record and record["graphprune_ms"] > 0
    assert (tmp_path / "kernels-cpu-interpreter.png").stat().st_size > 0
    assert "faster than torch BSR" in (tmp_path / "kernels-cpu-interpreter.md").read_text()
