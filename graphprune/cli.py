"""graphprune on the command line.

    graphprune prune torchvision:resnet50 --ratio 0.5 --save out/r50     prune, print before/after, save
    graphprune prune hf:./tiny-llama --target-params 0.7 --calibration text.txt --importance activation --save out/llm
    graphprune analyze timm:resnet18                                      the channel groups, and what blocks the rest
    graphprune eval out/r50                                               reload onto a fresh original, measure again

MODEL is ``torchvision:NAME``, ``timm:NAME``, ``hf:DIR`` (a local Hugging Face model directory with config.json;
nothing is downloaded) or ``module:factory`` / ``package.module:factory`` (a function returning the model; the
current directory is importable). ``--weights FILE`` loads a state dict (.safetensors, or .pt read with
``torch.load(weights_only=True)``) into the built model, strictly.

Bad paths and bad specs print one line on stderr and exit with 2.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import inspect
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from .errors import GraphpruneError

SOURCES = "torchvision:NAME, timm:NAME, hf:DIR or module:factory"
BUDGETS = (("ratio", "ratio"), ("target_flops", "target-flops"), ("target_params", "target-params"),
           ("target_latency", "target-latency"))
GRADIENT_NEEDS = {"grad", "fisher", "unit_fisher"}  # importance criteria that take a loss


class CliError(Exception):
    """A bad command line, path or spec: one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage and exits; we want one line and a return code
        raise CliError(f"{message} (see {self.prog} --help)")


# --- models -------------------------------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[str, str]:
    source, _, name = spec.partition(":")
    if not source or not name:
        raise CliError(f"model spec {spec!r} should be one of {SOURCES} (e.g. torchvision:resnet50)")
    return source, name


def _hf_dir(name: str) -> Path:
    d = Path(name).expanduser()
    if not d.is_dir():
        raise CliError(f"hf:{name}: no such directory (hf: takes a local model directory; nothing is downloaded)")
    if not (d / "config.json").is_file():
        raise CliError(f"hf:{name}: {d} has no config.json; give a directory written by save_pretrained")
    return d.resolve()


def _hf_causal(cfg) -> bool:
    names = set(getattr(cfg, "architectures", None) or [])
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal
        known = set(causal.values())
    except ImportError:
        known = set()
    return any(a in known or a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in names)


def _hf_has_weights(d: Path) -> bool:
    return any(d.glob("*.safetensors")) or any(d.glob("pytorch_model*.bin"))


def _build_hf(d: Path, meta: bool) -> torch.nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cfg = transformers.AutoConfig.from_pretrained(d, local_files_only=True)
    cls = transformers.AutoModelForCausalLM if _hf_causal(cfg) else transformers.AutoModel
    if meta or not _hf_has_weights(d):  # a config-only directory: random weights (fill them with --weights)
        with torch.device("meta") if meta else contextlib.nullcontext():
            return cls.from_config(cfg)
    return cls.from_pretrained(d, local_files_only=True)


def build_model(spec: str, *, meta: bool = False) -> torch.nn.Module:
    """The model a spec names, with its own (torchvision/timm: random; hf: the directory's) weights;
    ``meta=True`` builds it on the meta device (no weight memory)."""
    source, name = parse_spec(spec)
    where = torch.device("meta") if meta else contextlib.nullcontext()
    try:
        if source == "hf":
            return _build_hf(_hf_dir(name), meta)
        if source == "torchvision":
            import torchvision

            # a segmentation or detection model's backbone has weights of its own, pretrained by default: downloaded
            takes = inspect.signature(torchvision.models.get_model_builder(name)).parameters
            with where:
                return torchvision.models.get_model(name, weights=None, **({"weights_backbone": None} if "weights_backbone" in takes else {}))
        if source == "timm":
            import timm

            with where:
                return timm.create_model(name, pretrained=False)
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        importlib.invalidate_caches()
        module = importlib.import_module(source)
        factory = getattr(module, name, None)
        if not callable(factory):
            raise CliError(f"model spec {spec!r}: module {source} has no function {name!r} (model sources: {SOURCES})")
        with where:
            model = factory()
        if not isinstance(model, torch.nn.Module):
            raise CliError(f"model spec {spec!r}: {source}.{name}() returned a {type(model).__name__}, not a torch.nn.Module")
        return model
    except (CliError, GraphpruneError):
        raise
    except ModuleNotFoundError as e:
        raise CliError(f"cannot build model {spec!r}: no module named {e.name!r} (model sources: {SOURCES})") from e
    except Exception as e:  # noqa: BLE001 - whatever a model library raises for a bad name
        raise CliError(f"cannot build model {spec!r}: {_one_line(e)}") from e


def load_model(spec: str) -> torch.nn.Module:
    """The model a spec names (kept for callers of the earlier CLI)."""
    return build_model(spec)


def read_state_dict(path) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise CliError(f"weights file {path} does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        elif p.suffix in (".pt", ".pth", ".bin"):
            sd = torch.load(p, map_location="cpu", weights_only=True)
        else:
            raise CliError(f"weights file {path}: expected a .safetensors or .pt state dict")
    except CliError:
        raise
    except Exception as e:  # noqa: BLE001 - an unreadable or pickled-object file
        raise CliError(f"cannot read weights file {path}: {_one_line(e)}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CliError(f"weights file {path} does not hold a state dict (a dict of parameter name -> tensor)")
    return sd


def load_weights(model: torch.nn.Module, path, spec: str = "the model") -> None:
    """Load a state dict strictly: every key must exist with its shape, and every parameter and persistent
    buffer must be given (a tied tensor once is enough, as ``safetensors.torch.save_model`` writes it)."""
    sd = read_state_dict(path)
    own = model.state_dict(keep_vars=True)
    names_of: dict = {}
    for n, t in own.items():
        names_of.setdefault(id(t), set()).add(n)
    unexpected = sorted(set(sd) - set(own))
    missing = sorted(n for n in set(own) - set(sd) if not (names_of[id(own[n])] & set(sd)))
    shapes = [f"{n} is {tuple(sd[n].shape)} in the file but {tuple(own[n].shape)} in the model"
              for n in sd if n in own and tuple(sd[n].shape) != tuple(own[n].shape)]
    if unexpected or missing or shapes:
        what = [f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else "",
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})" if unexpected else "",
                shapes[0] if shapes else ""]
        raise CliError(f"weights file {path} does not fit {spec}: {'; '.join(w for w in what if w)}")
    for n in set(own) - set(sd):  # tied aliases: load through the name the file has
        sd[n] = sd[next(iter(names_of[id(own[n])] & set(sd)))]
    model.load_state_dict(sd, strict=True)


# --- inputs and calibration ---------------------------------------------------------------------------------


def _shape(text: str) -> tuple:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(v <= 0 for v in shape):
        raise CliError(f"--input-shape {text!r} should be positive comma-separated sizes, e.g. 1,3,224,224")
    return shape


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def read_tensors(path):
    """A tensor, or a list of tensors, from a .pt or .safetensors file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CliError(f"calibration file {path} does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            d = load_file(str(p))
            data = d[next(iter(d))] if len(d) == 1 else [d[k] for k in sorted(d, key=_natural)]
        else:
            data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CliError(f"cannot read calibration file {path}: {_one_line(e)}") from e
    if isinstance(data, tuple):
        data = list(data)
    ok = isinstance(data, torch.Tensor) and data.dim() >= 1 and len(data) > 0
    ok = ok or (isinstance(data, list) and data and all(isinstance(t, torch.Tensor) for t in data))
    if not ok:
        raise CliError(f"calibration file {path} should hold a tensor of shape (N, ...) or a list of tensors")
    return data


def _as_model_dtype(data, model):
    """Floating calibration data in the model's own float type: ``torch.from_numpy`` gives float64, and
    a float32 model refused it with advice to make its forward traceable (survey 15)."""
    dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), None)
    cast = lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t  # noqa: E731
    return cast(data) if isinstance(data, torch.Tensor) else [cast(t) for t in data]


def tensor_batches(data, batch_size: int) -> list[tuple]:
    if isinstance(data, torch.Tensor):
        return [(data[i:i + batch_size],) for i in range(0, len(data), batch_size)]
    return [(t,) for t in data]


def text_batches(path, hf_dir: Path, seq_len: int, batch_size: int) -> list[tuple]:
    """Token id blocks of ``seq_len`` from a text file, tokenized with the model directory's tokenizer."""
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise CliError(f"text calibration needs the tokenizer of {hf_dir}, which cannot be loaded: {_one_line(e)}") from e
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    ids = torch.tensor(tok(text, verbose=False)["input_ids"], dtype=torch.long).flatten()
    n = len(ids) // seq_len
    if n == 0:
        raise CliError(f"calibration text {path} has {len(ids)} tokens, fewer than one block of --seq-len {seq_len}")
    blocks = ids[:n * seq_len].view(n, seq_len)
    return [(blocks[i:i + batch_size],) for i in range(0, n, batch_size)]


def _is_text(path) -> bool:
    return Path(path).suffix not in (".pt", ".pth", ".safetensors")


def _lm_loss(out, batch):
    """Next-token cross-entropy of a causal LM on its own calibration ids (for taylor, hessian, fisher)."""
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out["logits"] if isinstance(out, dict) else out[0] if isinstance(out, (tuple, list)) else out
    ids = batch[0]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


class Job:
    """A built model with its example inputs (and calibration batches)."""

    def __init__(self, args, status, *, calibration: bool = False):
        self.spec = args.model
        source, name = parse_spec(args.model)
        self.hf_dir = _hf_dir(name) if source == "hf" else None
        if self.hf_dir is not None:
            self.spec = f"hf:{self.hf_dir}"
        self.weights = str(Path(args.weights).expanduser().resolve()) if args.weights else None
        if args.weights and not Path(self.weights).is_file():
            raise CliError(f"weights file {args.weights} does not exist")
        cal = getattr(args, "calibration", None) if calibration else None
        if cal is not None and not Path(cal).expanduser().is_file():
            raise CliError(f"calibration file {cal} does not exist")
        text = cal is not None and _is_text(cal)
        if text and self.hf_dir is None:
            raise CliError(f"calibration file {cal} is read as text, which needs an hf: model (its tokenizer); "
                           "give a tensor file (.pt or .safetensors) for other models")
        given, batch_size = getattr(args, "seq_len", None), getattr(args, "batch_size", None)
        seq_len = 128 if given is None else given
        if seq_len <= 0 or (batch_size is not None and batch_size <= 0):
            raise CliError("--seq-len and --batch-size must be positive")
        if given is not None and not (self.hf_dir is not None and (text or (cal is None and not args.input_shape))):
            why = ("the model is not an hf: model: drop --seq-len" if self.hf_dir is None else
                   f"the tensors of {cal} keep their own length: drop --seq-len, or cut them to that length"
                   if cal is not None else "--input-shape gives the example: drop one of them")
            raise CliError(f"--seq-len {given} sets the token length of an hf: model's text calibration and built-in "
                           f"example, and here {why}")
        with status(f"building {self.spec}"):
            self.model = build_model(self.spec).eval()
        _takes_one_input(self.model, self.spec)
        if self.weights:
            with status(f"loading {args.weights}"):
                load_weights(self.model, self.weights, self.spec)
        self.kwargs = {}  # graphprune traces Hugging Face models without their KV cache by itself
        self.calibration = None
        shape = _shape(args.input_shape) if args.input_shape else None
        if cal is not None:
            with status(f"reading calibration {cal}"):
                if text:
                    self.calibration = text_batches(cal, self.hf_dir, seq_len, batch_size or 8)
                else:
                    data = _as_model_dtype(read_tensors(cal), self.model)
                    size = batch_size or (shape[0] if shape else 1)
                    self.calibration = tensor_batches(data, size)
        if shape is not None:
            if self.hf_dir is not None:
                vocab = getattr(self.model.config, "vocab_size", 2)
                self.x = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))
            else:
                self.x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        elif self.calibration is not None:  # the first calibration sample is the example
            self.x = self.calibration[0][0][:1]
        elif self.hf_dir is not None:
            vocab = getattr(self.model.config, "vocab_size", 2)
            self.x = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
        else:
            self.x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    @property
    def causal_lm(self) -> bool:
        return self.hf_dir is not None and _hf_causal(self.model.config)


# --- commands -----------------------------------------------------------------------------------------------


def _takes_one_input(model: torch.nn.Module, spec: str) -> None:
    """The CLI gives the forward one positional input (``--input-shape``): a forward that needs more
    failed deep in tracing, with advice about traceable code (survey 34 F4)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return
    need = [q.name for q in params if q.default is q.empty and q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
    if len(need) > 1:
        raise CliError(f"{spec}: its forward takes {len(need)} inputs ({', '.join(need)}), and the command line gives "
                       "one (--input-shape): prune it from Python, graphprune.compile(model, (a, b, ...), ...)")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:400]}" if not isinstance(e, (CliError, GraphpruneError)) else text


def _stepper(console):
    """``with step("pruning"):`` shows a spinner with elapsed time on a terminal (stderr), and, when done,
    one line with the time taken; nothing when stderr is not a terminal."""
    from rich.markup import escape
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    @contextlib.contextmanager
    def step(label: str):
        if not console.is_terminal:
            yield
            return
        t = time.perf_counter()
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                      transient=True) as progress:
            progress.add_task(escape(label) + "...", total=None)
            yield
        console.print(f"[green]done[/green] {escape(label)} ({time.perf_counter() - t:.1f} s)")

    return step


def _args_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="graphprune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{prune,analyze,eval}")

    def model_args(p):
        p.add_argument("model", nargs="?", default="torchvision:resnet50", help=f"{SOURCES} (default torchvision:resnet50)")
        p.add_argument("--weights", metavar="FILE", help="state dict (.safetensors or .pt) loaded strictly into the built model")
        p.add_argument("--input-shape", help="comma-separated example input shape (default 1,3,224,224; "
                       "hf: token ids of shape 1,SEQ_LEN; with --calibration: its first sample)")
        p.add_argument("--seq-len", type=int, help="hf: example and text calibration block length in tokens (default 128)")
        p.add_argument("--ignore", action="append", default=[], help="module whose output width must stay (repeatable)")

    p = sub.add_parser("prune", help="prune a model; print parameters, FLOPs and CPU latency before and after")
    model_args(p)
    p.add_argument("--ratio", type=float, help="fraction of the units of every group to remove, in [0, 1) (default 0.5)")
    p.add_argument("--target-flops", type=float, help="fraction of the FLOPs to keep, in (0, 1]")
    p.add_argument("--target-params", type=float, help="fraction of the parameters to keep, in (0, 1]")
    p.add_argument("--target-latency", type=float, help="fraction of the CPU latency to keep, in (0, 1]")
    p.add_argument("--importance", default="auto", help="l1, l2, bn_scale, taylor, hessian, fisher, activation, ... (default auto: chosen on held-out calibration batches, l2 without calibration)")
    p.add_argument("--calibration", metavar="FILE", help="a tensor (N, ...) or list of tensors (.pt or .safetensors), "
                   "or for hf: models a text file tokenized with the model's tokenizer")
    p.add_argument("--batch-size", type=int, help="calibration batch size (default: the example's batch size for "
                   "tensor files, 8 for text)")
    p.add_argument("--save", metavar="DIR", help="write the pruned model (safetensors + manifest.json), report.json and widths.png to DIR")
    a = sub.add_parser("analyze", help="print the channel groups of a model and what blocks the rest")
    model_args(a)
    e = sub.add_parser("eval", help="load a model saved with prune --save onto a fresh original; print parameters, FLOPs, latency")
    e.add_argument("dir")
    return ap


def main(argv=None) -> int:
    from rich.console import Console

    out, err = Console(), Console(stderr=True)
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = _args_parser().parse_args(argv)
        step = _stepper(err)
        if args.cmd == "eval":
            return _eval(args.dir, out, step)
        if args.cmd == "analyze":
            return _analyze(args, step)
        return _prune(args, out, step)
    except (CliError, GraphpruneError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        if debug:
            raise
        print(f"graphprune: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("graphprune: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line, not a traceback; --debug shows it
        if debug:
            raise
        print(f"graphprune: unexpected error: {_one_line(e)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _budget(args) -> dict:
    given = {key: getattr(args, key) for key, _ in BUDGETS if getattr(args, key) is not None}
    if len(given) > 1:
        flags = " and ".join(f"--{flag}" for key, flag in BUDGETS if key in given)
        raise CliError(f"give one of --ratio, --target-flops, --target-params or --target-latency, not {flags}")
    if not given:
        given = {"ratio": 0.5}
    (key, value), = given.items()
    flag = dict(BUDGETS)[key]
    if key == "ratio" and not 0 <= value < 1:
        raise CliError(f"--ratio is the fraction of units to remove and must be in [0, 1), got {value}")
    if key != "ratio" and not 0 < value <= 1:
        raise CliError(f"--{flag} is the fraction to keep and must be in (0, 1], got {value}")
    return given


def _prune(args, console, step) -> int:
    import graphprune
    from graphprune.importance import _NEEDS

    budget = _budget(args)
    needs = set(_NEEDS.get(args.importance, ()))
    if args.importance not in _NEEDS and args.importance != "auto":
        raise CliError(f"unknown importance {args.importance!r}; choose one of auto, {', '.join(sorted(_NEEDS))}")
    if args.save and Path(args.save).exists() and not Path(args.save).is_dir():
        raise CliError(f"--save {args.save}: exists and is not a directory")
    job = Job(args, step, calibration=True)
    loss_fn = None
    if needs & GRADIENT_NEEDS:
        if not job.causal_lm:
            raise CliError(f"--importance {args.importance} needs a loss; the command line has one only for hf: causal "
                           "language models (next-token loss on the calibration text). Use graphprune.compile(..., loss_fn=) in Python")
        loss_fn = _lm_loss
    if needs and job.calibration is None:
        raise CliError(f"--importance {args.importance} scores units on data: give --calibration FILE")
    what = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in budget.items())
    t = time.perf_counter()
    with step(f"pruning {job.spec} ({what}, importance {args.importance})"):
        small = graphprune.compile(job.model, (job.x,), **budget, importance=args.importance, ignore=args.ignore,
                                   example_kwargs=job.kwargs or None, calibration=job.calibration, loss_fn=loss_fn)
    took = time.perf_counter() - t
    rows = _table(console, f"{job.spec} at {what} (compiled in {took:.2f} s, {small.report.form} form)",
                  job.model, small.eval(), (job.x,), job.kwargs, step)
    console.print(f"verify: {small.report.verify}", markup=False, soft_wrap=True)
    if args.save:
        with step(f"saving to {args.save}"):
            _save(small, args, job, budget, rows, took, console)
        console.print(f"saved to {args.save}", markup=False, soft_wrap=True)
    return 0


def _save(small, args, job, budget: dict, rows: dict, took: float, console) -> None:
    import dataclasses

    import graphprune

    path = Path(args.save)
    graphprune.save(small, path)
    (path / "source.json").write_text(json.dumps({
        "model": job.spec, "weights": job.weights, "hf_dir": None if job.hf_dir is None else str(job.hf_dir),
        "cwd": os.getcwd(),  # where a module:factory spec was imported from (eval may run elsewhere)
    }, indent=1))
    rep = small.report
    widths = graphprune.module_form.info(small)["widths"]
    check = rep.verify
    report = {
        "model": job.spec,
        "weights": job.weights,
        "budget": budget,
        "importance": args.importance,
        "calibration": None if args.calibration is None else {"file": str(Path(args.calibration).resolve()),
                                                              "batches": len(job.calibration)},
        "example_inputs": [list(job.x.shape)],
        "example_kwargs": job.kwargs,
        "compile_seconds": round(took, 3),
        **rows,
        "achieved": {"flops": rep.flops, "params": rep.params, "latency": rep.latency},  # fractions compile measured (budgets only)
        "form": rep.form,
        "form_why": rep.form_why,
        "verify": ({**dataclasses.asdict(check), "summary": str(check)} if dataclasses.is_dataclass(check)
                   else None if check is None else str(check)),
        "groups": [{"id": gid, "before": int(b), "after": int(a)} for gid, (b, a) in sorted(widths.items())],
    }
    (path / "report.json").write_text(json.dumps(report, indent=1, default=str))
    try:
        _plot_widths(widths, path / "widths.png", f"{job.spec}: units per prunable group")
    except ImportError:
        print("graphprune: note: matplotlib is not installed; widths.png not written", file=sys.stderr)


def _plot_widths(widths: dict, file: Path, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no global state

    ids = sorted(widths)
    n = len(ids)
    fig = Figure(figsize=(min(max(6.0, 0.3 * n + 2), 40.0), 4.0))
    ax = fig.add_subplot()
    pos = list(range(n))
    ax.bar([i - 0.2 for i in pos], [widths[g][0] for g in ids], width=0.4, label="before", color="#b0b0b0")
    ax.bar([i + 0.2 for i in pos], [widths[g][1] for g in ids], width=0.4, label="after", color="#1f77b4")
    ax.set_xticks(pos, [str(g) for g in ids], fontsize=7 if n > 30 else 9)
    ax.set_xlabel("group")
    ax.set_ylabel("units")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=100)


def _analyze(args, step) -> int:
    import graphprune

    job = Job(args, step)
    with step(f"analyzing {job.spec}"):
        analysis = graphprune.analyze(job.model, (job.x,), ignore=args.ignore, example_kwargs=job.kwargs or None)
    print(analysis.summary())
    return 0


def _example(manifest: dict, model) -> tuple[tuple, dict]:
    """Inputs shaped like the saved example: random floats, token ids in the vocabulary for integers."""
    gen = torch.Generator().manual_seed(0)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 2

    def make(spec):
        if "tensor" not in spec:
            return spec.get("value")
        dtype = getattr(torch, spec.get("dtype", "float32"), torch.float32)
        if dtype.is_floating_point:
            return torch.randn(spec["tensor"], generator=gen).to(dtype)
        if dtype == torch.bool:
            return torch.ones(spec["tensor"], dtype=torch.bool)
        return torch.randint(0, vocab, spec["tensor"], generator=gen, dtype=dtype)

    return tuple(make(s) for s in manifest["inputs"]["args"]), {k: make(s) for k, s in manifest["inputs"]["kwargs"].items()}


def _eval(path: str, console, step) -> int:
    """Rebuild a saved model onto a freshly built original (on meta where the saved graph allows) and measure
    it against the original."""
    import graphprune
    from graphprune.checkpoint import read_manifest

    d = Path(path)
    if not d.is_dir():
        raise CliError(f"{path} is not a directory" if d.exists() else f"{path}: no such directory")
    manifest = read_manifest(d)
    source = d / "source.json"
    if not source.is_file():
        raise CliError(f"{path} has no source.json: it was not written by 'graphprune prune --save'; "
                       "load it in Python with graphprune.load(original, path)")
    try:
        src = json.loads(source.read_text())
        spec = src["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CliError(f"{source} is damaged ({_one_line(e)}); save the model again") from e
    weights = src.get("weights")
    if isinstance(src.get("cwd"), str) and src["cwd"] not in sys.path:
        sys.path.append(src["cwd"])  # a module:factory spec imports from where prune ran, after this directory
    with step(f"building {spec}"):
        model = build_model(spec).eval()
    if weights and Path(weights).is_file():
        with step(f"loading {weights}"):
            load_weights(model, weights, spec)
    elif weights:
        print(f"graphprune: note: the weights file {weights} is gone; the original is measured with the model's "
              "own weights (parameters, FLOPs and latency do not depend on them)", file=sys.stderr)
    with step(f"loading {path}"):
        # a graph from torch.export bakes in the device it was traced on (a meta original would leave
        # meta-device constants in it), so that one is rebuilt onto the real original
        small, onto = None, "the original"
        if manifest["source"].get("method") == "symbolic_trace" or manifest.get("form") == "module":
            try:
                small, onto = graphprune.load(build_model(spec, meta=True), d), "a meta original"
            except GraphpruneError:
                raise
            except Exception:  # noqa: BLE001 - the meta device is an optimisation: fall back to the real original
                small = None
            if small is not None and any(t.is_meta for t in [*small.parameters(), *small.buffers()]):
                small = None
        if small is None:
            small = graphprune.load(model, d)
    args, kwargs = _example(manifest, model)
    _table(console, f"{spec} loaded from {path} onto {onto} ({manifest['form']} form)", model, small.eval(), args, kwargs, step)
    if manifest.get("report"):
        console.print(f"saved report: {manifest['report']}", markup=False, soft_wrap=True)
    return 0


def _first_tensor(out):
    from graphprune.verify import flatten

    return next((t for t in flatten(out) if isinstance(t, torch.Tensor)), None)


def _human(v: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {suffix}"
    return f"{v:.0f}"


def _table(console, title: str, model, small, args: tuple, kwargs: dict, step) -> dict:
    """Print parameters, FLOPs and CPU latency before and after; return them."""
    from rich.table import Table

    from graphprune.flops import count_flops, count_params, latency_ms, latency_ratio

    with step("measuring FLOPs and latency"):
        big_call, small_call = functools.partial(model, **kwargs), functools.partial(small, **kwargs)
        before_ms = latency_ms(big_call, args)
        # the ratio is measured side by side (the models alternate); "after" is derived from it
        after_ms = before_ms * latency_ratio(small_call, big_call, args)
        measured = {
            "parameters": (count_params(model), count_params(small)),
            "flops": (count_flops(model, args, kwargs), count_flops(small, args, kwargs)),
            "latency_ms": (before_ms, after_ms),
        }
        with torch.no_grad():
            shapes = [_first_tensor(m(*args, **kwargs)) for m in (model, small)]
    fmt = {"parameters": ("parameters", _human), "flops": ("FLOPs", _human), "latency_ms": ("CPU latency", lambda v: f"{v:.1f} ms")}
    console.print(title, markup=False, soft_wrap=True)
    table = Table()
    for col in ("", "before", "after", "after/before"):
        table.add_column(col, justify="right")
    rows = {}
    for key, (before, after) in measured.items():
        name, f = fmt[key]
        table.add_row(name, f(before), f(after), f"{after / before:.3f}" if before else "-")
        rows[key] = {"before": before, "after": after, "after/before": after / before if before else None}
    console.print(table)
    if all(s is not None for s in shapes):
        console.print(f"output shape {tuple(shapes[0].shape)} -> {tuple(shapes[1].shape)}", markup=False, soft_wrap=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
