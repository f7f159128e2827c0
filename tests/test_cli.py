"""The command line: prune --save, then eval in a fresh process; bad input exits with 2."""
import subprocess
import sys

from graphprune.cli import main


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "graphprune.cli", *args], capture_output=True, text=True, timeout=600)


def test_prune_save_then_eval_in_a_fresh_process(tmp_path):
    out = tmp_path / "r18"
    r = _cli("prune", "torchvision:resnet18", "--ratio", "0.5", "--input-shape", "1,3,32,32", "--ignore", "fc", "--save", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "parameters" in r.stdout and (out / "manifest.json").is_file() and (out / "model.safetensors").is_file()
    r = _cli("eval", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "loaded from" in r.stdout and "module form" in r.stdout


def test_bad_specs_and_paths_exit_with_2(tmp_path, capsys):
    assert main(["prune", "torchvision:no_such_net"]) == 2
    assert main(["prune", "no.such.module:factory"]) == 2
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().out
