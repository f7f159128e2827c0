"""The command line: prune (weights, budgets, calibration, --save with report.json and widths.png), analyze,
eval in a fresh process, Hugging Face directories; bad paths and specs exit with 2 and one line on stderr."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

import graphprune
from graphprune.cli import _human, main


@pytest.fixture(autouse=True)
def one_thread():
    """The CPU is shared: one thread keeps forward passes (latency, verify) fast and steady."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cli(*args):
    """The installed ``graphprune`` script (``python -m graphprune.cli`` where it is not installed), in a fresh process."""
    script = Path(sys.executable).parent / "graphprune"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "graphprune.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=600, env=env)


def _came_from(saved: dict, manifest: dict, sd: dict, name: str) -> bool:
    """The saved tensor ``name`` is the file's tensor with the kept indices of each pruned axis."""
    want = sd[name]
    for axis, idx in manifest["kept"].get(name, {}).items():
        want = want.index_select(int(axis), torch.tensor(idx))
    return saved[name].shape == want.shape and torch.equal(saved[name], want)


def _weights_file(model, path):
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return load_file(str(path))


def test_prune_weights_target_params_save_then_eval_in_a_fresh_process(tmp_path, capsys):
    torch.manual_seed(3)
    sd = _weights_file(torchvision.models.resnet18(), tmp_path / "r18.safetensors")
    out = tmp_path / "r18"
    rc = main(["prune", "torchvision:resnet18", "--weights", str(tmp_path / "r18.safetensors"), "--target-params", "0.6",
               "--input-shape", "1,3,64,64", "--save", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "parameters" in printed and "module form" in printed

    # the weights came from the file: unpruned tensors equal, pruned ones are its kept rows and columns
    manifest = json.loads((out / "manifest.json").read_text())
    saved = load_file(str(out / "model.safetensors"))
    assert "conv1.weight" in manifest["kept"]
    for name in ("fc.bias", "conv1.weight", "layer1.0.conv1.weight", "layer4.1.bn2.running_var"):
        assert _came_from(saved, manifest, sd, name), name

    report = json.loads((out / "report.json").read_text())
    assert report["budget"] == {"target_params": 0.6}
    assert report["weights"] == str((tmp_path / "r18.safetensors").resolve())
    assert 0.4 < report["parameters"]["after/before"] <= 0.6 and report["achieved"]["params"] <= 0.6
    assert report["parameters"]["after"] == graphprune.count_params(graphprune.load(torchvision.models.resnet18(), out))
    assert report["flops"]["after"] < report["flops"]["before"] and report["latency_ms"]["before"] > 0
    assert report["form"] == "module" and "reproduces" in report["form_why"]
    assert report["verify"]["status"] == "passed" and report["verify"]["inputs"]
    groups = report["groups"]
    assert len(groups) == 12 and all(g["after"] <= g["before"] for g in groups) and any(g["after"] < g["before"] for g in groups)
    assert [g["before"] for g in groups[:3]] == [64, 64, 64]
    png = (out / "widths.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert json.loads((out / "source.json").read_text())["weights"] == report["weights"]

    r = _cli("eval", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "loaded from" in r.stdout and "onto a meta original" in r.stdout and "module form" in r.stdout
    assert _human(report["parameters"]["after"]) in r.stdout and _human(report["flops"]["after"]) in r.stdout


def test_calibration_tensor_file_with_activation_importance(tmp_path):
    torch.manual_seed(4)
    model = torchvision.models.resnet18().eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    calib = torch.randn(6, 3, 32, 32)
    torch.save(calib, tmp_path / "calib.pt")
    out = tmp_path / "cli"
    assert main(["prune", "torchvision:resnet18", "--weights", str(tmp_path / "w.pt"), "--calibration", str(tmp_path / "calib.pt"),
                 "--importance", "activation", "--ratio", "0.3", "--input-shape", "2,3,32,32", "--save", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["batches"] == 3 and report["importance"] == "activation"

    # the same compile in Python: batches of the example's batch size, each a 1-tuple
    ref = graphprune.compile(model, (torch.randn(2, 3, 32, 32),), ratio=0.3, importance="activation",
                             calibration=[(calib[i:i + 2],) for i in (0, 2, 4)])
    graphprune.save(ref, tmp_path / "ref")
    kept = json.loads((out / "manifest.json").read_text())["kept"]
    assert kept == json.loads((tmp_path / "ref" / "manifest.json").read_text())["kept"]
    # and calibration data decides: other data keeps other channels
    other = graphprune.compile(model, (torch.randn(2, 3, 32, 32),), ratio=0.3, importance="activation",
                               calibration=[(torch.randn(2, 3, 32, 32) * torch.linspace(0, 3, 32),)])
    graphprune.save(other, tmp_path / "other")
    assert kept != json.loads((tmp_path / "other" / "manifest.json").read_text())["kept"]


def test_analyze_prints_the_groups(tmp_path, monkeypatch, capsys):
    assert main(["analyze", "torchvision:resnet18", "--input-shape", "1,3,32,32"]) == 0
    out = capsys.readouterr().out
    want = graphprune.analyze(torchvision.models.resnet18().eval(), (torch.randn(1, 3, 32, 32),)).summary()
    assert out.strip() == want.strip() and "12 prunable groups" in out

    # module:factory, importable from the current directory
    (tmp_path / "gp_cli_factory.py").write_text(
        "import torch\n"
        "def net():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))\n")
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", "gp_cli_factory:net", "--input-shape", "1,3,16,16"]) == 0
    out = capsys.readouterr().out
    assert "1 prunable groups" in out and "group 0: 8 units" in out


VOCAB = 100


def _tiny_llama(seed: int):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg)


def _word_tokenizer(text: str, directory: Path) -> None:
    """A word-level tokenizer trained offline on ``text`` (nothing downloads), saved next to the model."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], tokenizers.trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["[UNK]"]))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(directory)


def test_hf_directory_with_text_and_tensor_calibration_then_eval(tmp_path, capsys):
    hf = tmp_path / "tiny-llama"
    _tiny_llama(0).save_pretrained(hf)
    sd = _weights_file(_tiny_llama(1), tmp_path / "w.safetensors")  # other weights than the directory's
    words = "the quick brown fox jumps over a lazy dog while small models learn to prune their channels".split()
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(0, len(words), (200,), generator=g).tolist())
    (tmp_path / "calib.txt").write_text(text)
    _word_tokenizer(text, hf)

    out = tmp_path / "pruned"
    assert main(["prune", f"hf:{hf}", "--weights", str(tmp_path / "w.safetensors"), "--calibration", str(tmp_path / "calib.txt"),
                 "--seq-len", "16", "--batch-size", "4", "--importance", "activation", "--ratio", "0.25", "--save", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert f"{report['form']} form" in printed and report["form_why"] and "(1, 16, 100) -> (1, 16, 100)" in printed
    assert report["example_inputs"] == [[1, 16]] and report["example_kwargs"] == {}  # traced without the KV cache by graphprune itself
    assert report["calibration"]["batches"] == 3  # 200 words, one token each -> 12 blocks of 16 -> 3 batches of 4
    assert {"before": 64, "after": 48} in [{k: g[k] for k in ("before", "after")} for g in report["groups"]]
    manifest = json.loads((out / "manifest.json").read_text())
    saved = load_file(str(out / "model.safetensors"))
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        assert name in manifest["kept"] and _came_from(saved, manifest, sd, name), name  # (norm weights are rescaled)
    source = json.loads((out / "source.json").read_text())
    assert source["hf_dir"] == str(hf.resolve()) and source["weights"] == str((tmp_path / "w.safetensors").resolve())

    r = _cli("eval", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "loaded from" in r.stdout and f"{manifest['form']} form" in r.stdout and "(1, 16, 100) -> (1, 16, 100)" in r.stdout
    assert _human(report["parameters"]["after"]) in r.stdout
    if manifest["form"] == "module":  # (an exported graph is rebuilt onto the real original: it bakes in its device)
        assert "onto a meta original" in r.stdout

    # token ids as a tensor file: split into batches, the first sample is the example
    save_file({"ids": torch.randint(0, VOCAB, (6, 12), generator=g)}, str(tmp_path / "ids.safetensors"))
    assert main(["prune", f"hf:{hf}", "--calibration", str(tmp_path / "ids.safetensors"), "--batch-size", "3",
                 "--importance", "activation", "--target-params", "0.8"]) == 0
    printed = capsys.readouterr().out
    assert "target-params 0.8" in printed and "(1, 12, 100) -> (1, 12, 100)" in printed


def test_bad_specs_and_paths_exit_with_2_and_one_line(tmp_path, capsys):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pt")
    (tmp_path / "not_saved").mkdir()
    (tmp_path / "no_config").mkdir()
    torch.save(torch.randn(4, 3, 32, 32), tmp_path / "c.pt")
    (tmp_path / "c.txt").write_text("some words")
    cases = {
        "missing weights": (["prune", "torchvision:resnet18", "--weights", str(tmp_path / "missing.safetensors")], "does not exist"),
        "weights of another model": (["prune", "torchvision:resnet34", "--weights", str(tmp_path / "r18.pt")], "missing keys"),
        "unknown source": (["prune", "no.such.module:factory"], "no module named"),
        "unknown torchvision model": (["prune", "torchvision:no_such_net"], "no_such_net"),
        "no source": (["analyze", "resnet50"], "should be one of"),
        "not a saved model": (["eval", str(tmp_path / "not_saved")], "manifest.json"),
        "no such directory": (["eval", str(tmp_path / "missing")], "no such directory"),
        "two budgets": (["prune", "--ratio", "0.5", "--target-flops", "0.5"], "give one of"),
        "ratio out of range": (["prune", "--ratio", "1.5"], "[0, 1)"),
        "target out of range": (["prune", "--target-params", "0"], "(0, 1]"),
        "not a number": (["prune", "--ratio", "half"], "invalid float"),
        "hf without config": (["prune", f"hf:{tmp_path / 'no_config'}"], "config.json"),
        "missing calibration": (["prune", "torchvision:resnet18", "--calibration", str(tmp_path / "nope.pt")], "does not exist"),
        "text without a tokenizer": (["prune", "torchvision:resnet18", "--calibration", str(tmp_path / "c.txt")], "hf:"),
        "data criterion without data": (["prune", "torchvision:resnet18", "--importance", "activation"], "--calibration"),
        "gradient criterion without a loss": (["prune", "torchvision:resnet18", "--importance", "taylor",
                                               "--calibration", str(tmp_path / "c.pt")], "loss"),
        # --seq-len where nothing reads it was ignored without a word (survey 27: an hf: model, a tensor file)
        "token length for an image model": (["prune", "torchvision:resnet18", "--seq-len", "16"], "--seq-len 16"),
        "token length beside a tensor file": (["prune", "torchvision:resnet18", "--seq-len", "16", "--calibration",
                                               str(tmp_path / "c.pt")], "--seq-len 16"),
    }
    for case, (argv, says) in cases.items():
        assert main(argv) == 2, case
        cap = capsys.readouterr()
        lines = cap.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("graphprune: error:") and says in lines[0], (case, cap.err)
        assert "Traceback" not in cap.err + cap.out, case

    r = _cli("eval", tmp_path / "not_saved")  # the installed script: exit status 2, one line, no traceback
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "manifest.json" in r.stderr and "Traceback" not in r.stderr


def test_float64_calibration_is_read_in_the_models_float_type(tmp_path):
    """``torch.from_numpy`` gives float64: a float32 model exited 2 with 'make the forward traceable' (survey 15)."""
    torch.manual_seed(0)
    torch.save(torch.randn(4, 3, 32, 32, dtype=torch.float64), tmp_path / "calib.pt")
    out = tmp_path / "cli"
    assert main(["prune", "torchvision:resnet18", "--calibration", str(tmp_path / "calib.pt"), "--importance", "activation",
                 "--ratio", "0.3", "--save", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["calibration"]["batches"] == 4


def test_eval_of_a_module_factory_runs_from_another_directory(tmp_path, monkeypatch):
    """``source.json`` held only ``mod:factory``: eval found the module only from the directory prune ran in
    (survey 15)."""
    proj, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    proj.mkdir(), elsewhere.mkdir()
    (proj / "gp_cli_eval_factory.py").write_text(
        "import torch\n"
        "def net():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))\n")
    monkeypatch.chdir(proj)
    assert main(["prune", "gp_cli_eval_factory:net", "--input-shape", "1,3,16,16", "--ratio", "0.5",
                 "--save", str(tmp_path / "out")]) == 0
    script = Path(sys.executable).parent / "graphprune"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "graphprune.cli"]
    r = subprocess.run([*cmd, "eval", str(tmp_path / "out")], capture_output=True, text=True, timeout=600, cwd=elsewhere,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "loaded from" in r.stdout


def test_an_input_shape_the_model_cannot_take_is_one_line(tmp_path):
    """torch's fake-tensor logger printed every failed meta kernel with its traceback (118 lines, five
    tracebacks) before the one-line message (survey 27)."""
    (tmp_path / "gp_cli_mlp.py").write_text(
        "import torch\n"
        "def mlp():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))\n")
    script = Path(sys.executable).parent / "graphprune"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "graphprune.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([*cmd, "prune", "gp_cli_mlp:mlp", "--input-shape", "4,16,5"], capture_output=True, text=True,
                       timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "fcn_resnet50"])
def test_a_torchvision_model_with_a_backbone_is_built_without_downloading(name, monkeypatch):
    """get_model(weights=None) leaves weights_backbone at its default, ImageNet weights, which the CLI went
    to download (and failed offline, or silently took pretrained weights for a random model) (survey 34 F2)."""
    from graphprune.cli import build_model

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setenv("TORCH_HOME", "/nonexistent-graphprune-test")  # no cached weights either
    model = build_model(f"torchvision:{name}", meta=True)
    assert any(True for _ in model.parameters())


def test_a_model_of_two_inputs_is_refused_up_front(tmp_path, monkeypatch, capsys):
    """RAFT's forward takes two images; the CLI gives one, and the error was torch.export's missing argument
    wrapped in advice to make the forward traceable (survey 34 F4)."""
    (tmp_path / "two_inputs.py").write_text(
        "import torch\n"
        "class Two(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.a = torch.nn.Linear(4, 4)\n"
        "    def forward(self, x, y):\n"
        "        return self.a(x) + self.a(y)\n"
        "def build():\n"
        "    return Two()\n")
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", "two_inputs:build", "--input-shape", "2,4"]) == 2
    assert "takes 2 inputs (x, y)" in capsys.readouterr().err
