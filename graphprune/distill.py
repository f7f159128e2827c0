"""Recovery after pruning by knowledge distillation: the original teaches its pruned copy.

``distill(student, teacher, batches)`` trains the pruned model (graphprune's
copy, in module or graph form) to reproduce the original's outputs on
unlabelled calibration batches, in place, and returns it. The teacher runs in
eval mode under ``torch.no_grad()`` and is left as it was.

The loss, per batch (``out`` is what a model returns)::

    main tensor of out:  a tensor itself; a tuple's (or list's) first tensor; a
                         ModelOutput's (or dict's) ``logits``, else its
                         ``last_hidden_state``, else its first tensor
    default loss:        KL(teacher || student) over the last dim at temperature
                         T, times T^2, when the outputs are distributions' logits
                         (a tensor, a tuple, or an object with ``logits``); MSE
                         over the last dim otherwise (an object without
                         ``logits``: an encoder's ``last_hidden_state``)
    averaged over:       every position (token) and batch row; where the batch
                         has an ``attention_mask`` of the positions' shape,
                         padded positions (mask 0) are left out
    hidden_weight > 0:   plus hidden_weight * the mean over layers of the MSE
                         between hidden states (see ``distill``)

With ``lora_rank=r`` every student weight is frozen and each linear weight
``W`` (out x in) is trained as ``W + B @ A`` (A: r x in, random; B: out x r,
zero, so training starts at the pruned model), through
``torch.nn.utils.parametrize``; at the end ``B @ A`` is merged into ``W`` and
the parametrizations are removed, so the returned student has the classes,
parameter names and shapes it came with. Optimizer state is then kept only
for the low-rank factors.
"""
from __future__ import annotations

import inspect
import math
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from . import hf
from .batches import as_call, positional_capacity, split_targets
from .modes import modes_of, set_modes
from .verify import evaluating
from .errors import GraphpruneError, GraphpruneWarning, first_line

# fx call_function targets that compute x @ W.T (+ b) with W their second argument
_LINEAR_OPS = {F.linear, torch._C._nn.linear, torch.ops.aten.linear.default}


def distill(student: nn.Module, teacher: nn.Module, batches: Iterable, *, steps: int = 200, lr: float = 1e-4,
            temperature: float = 1.0, hidden_weight: float = 0.0, lora_rank: int | None = None,
            loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, schedule: str = "cosine",
            weight_decay: float = 0.0, progress: bool = True, max_seconds: float | None = None) -> nn.Module:
    """Train ``student`` (a pruned model) to reproduce ``teacher`` (the original) on ``batches``; return ``student``.

    ``student`` is trained in place: give graphprune's pruned copy (either
    form: the model's own class or an fx ``GraphModule``), never the model
    itself; a student that shares a parameter with the teacher is refused.
    ``teacher`` runs under ``torch.no_grad()`` in eval mode; its parameters,
    and its train/eval mode, are left as they were. The student trains in
    training mode; one already in training mode keeps the modules its user
    put in eval (frozen BatchNorms) in eval.

    ``batches`` is an iterable of inputs in any form ``compile``'s
    ``calibration`` takes: tuples of positional inputs, dicts of keyword
    inputs, tokenizer outputs. It is iterated again from the start whenever
    it runs out, until ``steps`` optimizer steps are done (a one-shot
    iterator ends training when it is exhausted). Tensors are moved to each
    model's device; Hugging Face models get ``use_cache=False``.

    The loss (module docstring for the full rule) is KL(teacher || student)
    at ``temperature`` (times T^2) on logits, averaged over every position
    and batch row, or MSE where the output has no ``logits`` (an encoder's
    ``last_hidden_state``; the temperature is then unused). ``loss_fn(s, t)``
    replaces it: it receives the student's and the teacher's main output
    tensors (``logits``, else ``last_hidden_state``, else the first tensor)
    and returns a scalar.

    ``hidden_weight > 0`` adds ``hidden_weight`` times the mean, over layers,
    of the MSE between the models' hidden states. A model is asked for them
    (``output_hidden_states=True``) only where its forward takes that
    argument (a Hugging Face model in its own class; not a GraphModule, whose
    outputs are fixed when traced), and layer i is matched with layer i only
    where both models return the same number of hidden states. Pruning a
    residual stream narrows it, so only hidden states whose shapes agree (the
    same last dim) are matched; the others are skipped, and if none match a
    warning says that ``hidden_weight`` has no effect.

    ``lora_rank=r`` freezes the student and trains a rank-r update of every
    linear weight instead, merged into the weights at the end (module
    docstring). Weights shared by several modules (tied embeddings) are left
    frozen.

    AdamW at ``lr`` (``weight_decay``), with a cosine decay to 0 over
    ``steps`` (``schedule="cosine"``) or a constant rate
    (``schedule="constant"``); gradients clipped to norm 1.0. ``max_seconds``
    stops earlier, and the cosine then runs over whichever ends first, so a
    time budget still ends at a low rate. ``progress=True`` shows a rich progress bar with the loss.

    ``student.distill_report`` is ``dict(steps, seconds, first_loss,
    last_loss, last_lr)``: optimizer steps taken, wall time, the loss of the first
    and of the last step's batch, and the rate the last step left.

    >>> small = graphprune.compile(model, (ids,), ratio=0.25)
    >>> small = graphprune.distill(small, model, [{"input_ids": b} for b in blocks], steps=500, lr=1e-4)
    >>> small = graphprune.distill(small, model, batches, steps=500, lr=1e-3, lora_rank=8)   # memory-light
    >>> small.distill_report
    """
    if student is teacher:
        raise GraphpruneError("distill trains the student in place: give graphprune's pruned copy as the student, not the "
                              "teacher itself")
    if not isinstance(steps, int) or steps < 1:
        raise GraphpruneError(f"steps must be a positive integer, got {steps!r}")
    if temperature <= 0:
        raise GraphpruneError(f"temperature must be positive, got {temperature!r}")
    if schedule not in ("cosine", "constant"):
        raise GraphpruneError(f"unknown schedule {schedule!r}; choose 'cosine' or 'constant'")
    if lora_rank is not None and (not isinstance(lora_rank, int) or lora_rank < 1):
        raise GraphpruneError(f"lora_rank must be a positive integer or None, got {lora_rank!r}")
    _check_separate(student, teacher)

    requires = {id(p): p.requires_grad for p in student.parameters()}
    modes = modes_of(student), modes_of(teacher)  # each module's own: a teacher with frozen BatchNorms keeps them frozen
    lora = _add_lora(student, lora_rank) if lora_rank is not None else []
    try:
        if lora:
            for p in student.parameters():
                p.requires_grad_(False)
            params = [p for _, m in lora for p in m.parameters()]
            for p in params:
                p.requires_grad_(True)
        else:
            params = [p for p in student.parameters() if p.requires_grad]
        if not params:
            raise GraphpruneError("the student has nothing to train: no parameter requires grad"
                                  + (" and no linear weight takes a low-rank update" if lora_rank is not None else ""))
        student.train()
        if modes[0][""]:  # a student already training keeps what its user froze (BatchNorms in eval: their
            set_modes(student, modes[0], True)  # statistics were overwritten, survey 26)
        teacher.eval()
        report = _train(student, teacher, batches, params, steps=steps, lr=lr, temperature=temperature,
                        hidden_weight=hidden_weight, loss_fn=loss_fn, schedule=schedule, weight_decay=weight_decay,
                        progress=progress, max_seconds=max_seconds)
    finally:  # also on an error or an interrupt: leave no parametrization behind
        _merge_lora(lora)
        for p in student.parameters():
            p.requires_grad_(requires.get(id(p), p.requires_grad))
            p.grad = None
        set_modes(student, modes[0], modes[0][""])
        set_modes(teacher, modes[1], modes[1][""])
    student.distill_report = report
    return student


@torch.no_grad()
def distill_loss(student: nn.Module, teacher: nn.Module, batches: Iterable, *, temperature: float = 1.0,
                 loss_fn: Callable | None = None) -> float:
    """The mean of ``distill``'s loss (without hidden states) over ``batches``, both models in eval mode; a way
    to measure how far the student is from the teacher on held-out inputs."""
    with evaluating(student, teacher):
        return _mean_loss(student, teacher, batches, temperature, loss_fn)


def _mean_loss(student, teacher, batches, temperature, loss_fn) -> float:
    losses = []
    takes = positional_capacity(teacher)
    for batch in batches:
        args, kwargs = as_call(split_targets(batch, takes))
        t_out = _run(teacher, args, kwargs, hidden=False)
        s_out = _run(student, args, kwargs, hidden=False)
        losses.append(_output_loss(s_out, t_out, _mask(kwargs), temperature, loss_fn).item())
    if not losses:
        raise GraphpruneError("distill_loss got no batches")
    return sum(losses) / len(losses)


# ----------------------------------------------------------------------------------------------- training loop

@torch.enable_grad()  # distill called under torch.no_grad() still trains
def _train(student, teacher, batches, params, *, steps, lr, temperature, hidden_weight, loss_fn, schedule,
           weight_decay, progress, max_seconds) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    start = time.perf_counter()

    def done_part(i: int) -> float:
        """How much of the run is behind: by steps, or by time where ``max_seconds`` ends it sooner
        (a cosine over 10,000 steps that a time limit stops at 300 never decays)."""
        part = min(i, steps) / steps
        if max_seconds:
            part = max(part, (time.perf_counter() - start) / max_seconds)
        return min(part, 1.0)

    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * done_part(i))))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    hidden = hidden_weight > 0 and _takes_hidden(student) and _takes_hidden(teacher)
    if hidden_weight > 0 and not hidden:
        warnings.warn("hidden_weight has no effect: "
                      + ("the student" if not _takes_hidden(student) else "the teacher")
                      + " does not take output_hidden_states", stacklevel=3)
    warned = False
    first = last = None
    done = 0
    columns = (TextColumn("distill"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("loss {task.fields[loss]}"))
    with Progress(*columns, console=Console(stderr=True), disable=not progress, transient=False) as bar:
        task = bar.add_task("distill", total=steps, loss="-")
        takes = positional_capacity(teacher)
        for batch in _cycle(batches, steps):
            args, kwargs = as_call(split_targets(batch, takes))  # (x, y) from a DataLoader: x
            try:
                with torch.no_grad():
                    t_out = _run(teacher, args, kwargs, hidden=hidden)
                s_out = _run(student, args, kwargs, hidden=hidden)
            except (RuntimeError, TypeError, ValueError, IndexError) as e:
                if done:
                    raise
                raise GraphpruneError(  # as recalibrate_bn and compile say it, not the model's own error
                    f"the first distillation batch does not fit the models ({type(e).__name__}: {first_line(e)[:200]}): "
                    "give batches as input tuples, dicts of keyword inputs or (x, y) pairs, each as the model "
                    "takes them") from e
            mask = _mask(kwargs)
            loss = _output_loss(s_out, t_out, mask, temperature, loss_fn)
            if hidden:
                h = _hidden_loss(s_out, t_out, mask)
                if h is None:
                    if not warned:
                        warnings.warn(GraphpruneWarning(
                            "hidden_weight has no effect: no hidden state of the student has the shape of the teacher's at "
                            "the same layer (a pruned residual stream is narrower)"), stacklevel=3)
                        warned = True
                else:
                    loss = loss + hidden_weight * h
            if not torch.isfinite(loss):
                raise GraphpruneError(f"the distillation loss is {loss.item()} at step {done + 1}: lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            done += 1
            last = loss.detach()
            if first is None:
                first = last.item()
            if progress:
                bar.update(task, advance=1, loss=f"{last.item():.4g}")
            if max_seconds is not None and time.perf_counter() - start >= max_seconds:
                break
    opt.zero_grad(set_to_none=True)
    if done == 0:
        raise GraphpruneError("distill got no batches")
    return {"steps": done, "seconds": time.perf_counter() - start, "first_loss": first, "last_loss": last.item(),
            "last_lr": opt.param_groups[0]["lr"]}


def _cycle(batches, steps: int):
    """``steps`` batches, iterating ``batches`` again from the start when it runs out."""
    n = 0
    while n < steps:
        got = False
        for b in batches:
            got = True
            yield b
            n += 1
            if n == steps:
                return
        if not got:
            return
        if iter(batches) is batches:  # a one-shot iterator: nothing more to come
            warnings.warn(f"distill: the batches ran out after {n} of {steps} steps (an iterator cannot be re-iterated; "
                          "give a list or another re-iterable)", stacklevel=4)
            return


# ----------------------------------------------------------------------------------------------- running the models

def _device(model: nn.Module):
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def _to(x, device):
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    if isinstance(x, list):
        return [_to(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _takes_hidden(model: nn.Module) -> bool:
    """Whether ``model``'s forward takes ``output_hidden_states``: by name, or a Hugging Face model's ``**kwargs``."""
    if isinstance(model, torch.fx.GraphModule):
        return False
    try:
        ps = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    if "output_hidden_states" in ps:
        return True
    return hf.is_hf(model) and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ps.values())


def _run(model: nn.Module, args: tuple, kwargs: dict, *, hidden: bool):
    dev = _device(model)
    args, kwargs = _to(args, dev), _to(dict(kwargs), dev)
    kwargs = hf.example_kwargs(model, kwargs) or {}
    if hidden:
        kwargs = {**kwargs, "output_hidden_states": True}
    return model(*args, **kwargs)


def _mask(kwargs: dict) -> torch.Tensor | None:
    m = kwargs.get("attention_mask")
    return m if isinstance(m, torch.Tensor) and m.dim() == 2 else None


# ----------------------------------------------------------------------------------------------- losses

def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, Mapping) or (hasattr(x, "values") and callable(x.values)):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        for v in x:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def _field(out, name: str):
    if isinstance(out, Mapping) or (hasattr(out, "keys") and callable(out.keys)):
        try:
            v = out[name] if name in out.keys() else None
        except (KeyError, TypeError):
            v = None
    else:
        v = getattr(out, name, None) if not isinstance(out, (torch.Tensor, tuple, list)) else None
    return v if isinstance(v, torch.Tensor) else None


def _main(out) -> tuple[torch.Tensor, bool]:
    """(the output's main tensor, whether it is logits: KL by default, else MSE)."""
    if isinstance(out, torch.Tensor):
        return out, True
    if isinstance(out, (tuple, list)):
        t = _first_tensor(out)
        kind = True
    else:
        t, kind = _field(out, "logits"), True
        if t is None:
            t, kind = _field(out, "last_hidden_state"), False
        if t is None:
            t, kind = _first_tensor(out), False
    if t is None:
        raise GraphpruneError(f"cannot find a tensor in the model's output ({type(out).__name__}): give loss_fn")
    return t, kind


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None and tuple(mask.shape) == tuple(per_position.shape):
        m = mask.to(per_position.device, per_position.dtype)
        return (per_position * m).sum() / m.sum().clamp_min(1)
    return per_position.mean()


def _output_loss(s_out, t_out, mask, temperature: float, loss_fn) -> torch.Tensor:
    s, s_logits = _main(s_out)
    t, t_logits = _main(t_out)
    t = t.to(s.device)
    if loss_fn is not None:
        return loss_fn(s, t)
    if s.shape != t.shape:
        raise GraphpruneError(f"the student's output has shape {tuple(s.shape)}, the teacher's {tuple(t.shape)}: the default "
                              "loss compares them position by position; give loss_fn(student_out, teacher_out)")
    s, t = s.float(), t.float()
    if s_logits and t_logits:
        T = float(temperature)
        log_s = F.log_softmax(s / T, dim=-1)
        log_t = F.log_softmax(t / T, dim=-1)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # KL(teacher || student) at each position
        return _masked_mean(kl, mask) * T * T
    return _masked_mean((s - t).square().mean(-1), mask)


def _hidden_states(out) -> tuple | None:
    h = out.get("hidden_states") if isinstance(out, Mapping) else getattr(out, "hidden_states", None)
    return tuple(h) if isinstance(h, (tuple, list)) and h else None


def _hidden_loss(s_out, t_out, mask) -> torch.Tensor | None:
    """Mean over layers of the MSE between hidden states of one shape; None where no layer matches."""
    hs, ht = _hidden_states(s_out), _hidden_states(t_out)
    if hs is None or ht is None or len(hs) != len(ht):
        return None
    terms = [_masked_mean((a.float() - b.to(a.device).float()).square().mean(-1), mask)
             for a, b in zip(hs, ht) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape]
    return torch.stack(terms).mean() if terms else None


# ----------------------------------------------------------------------------------------------- LoRA

class _LowRank(nn.Module):
    """A parametrization ``W -> W + B @ A`` with A: r x in, B: out x r (zero: it starts at W). Kept in float32."""

    def __init__(self, weight: torch.Tensor, rank: int):
        super().__init__()
        out_f, in_f = weight.shape
        self.A = nn.Parameter(torch.empty(rank, in_f, device=weight.device, dtype=torch.float32))
        self.B = nn.Parameter(torch.zeros(out_f, rank, device=weight.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W + (self.B @ self.A).to(W.dtype)


def _lora_targets(student: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every linear weight: nn.Linear modules, and in a GraphModule the parameters its
    graph reads as the weight of a linear op (an exported graph calls ``aten.linear`` on its own parameters)."""
    uses = Counter(id(p) for _, p in student.named_parameters(remove_duplicate=False))
    found: dict[int, tuple[nn.Module, str]] = {}

    def add(mod: nn.Module, name: str):
        p = mod._parameters.get(name)
        if isinstance(p, nn.Parameter) and p.dim() == 2 and p.is_floating_point() and uses[id(p)] == 1:
            found.setdefault(id(p), (mod, name))

    for mod in student.modules():
        if isinstance(mod, nn.Linear) and not parametrize.is_parametrized(mod, "weight"):
            add(mod, "weight")
    if isinstance(student, torch.fx.GraphModule):
        for node in student.graph.nodes:
            if node.op != "call_function" or node.target not in _LINEAR_OPS or len(node.args) < 2:
                continue
            w = node.args[1]
            if isinstance(w, torch.fx.Node) and w.op == "get_attr":
                path, _, name = str(w.target).rpartition(".")
                try:
                    mod = student.get_submodule(path)
                except AttributeError:
                    continue
                if not parametrize.is_parametrized(mod, name):
                    add(mod, name)
    return list(found.values())


def _add_lora(student: nn.Module, rank: int) -> list[tuple[tuple[nn.Module, str], _LowRank]]:
    added = []
    try:
        for mod, name in _lora_targets(student):
            lr_mod = _LowRank(getattr(mod, name), rank)
            parametrize.register_parametrization(mod, name, lr_mod)
            added.append(((mod, name), lr_mod))
    except Exception:
        _merge_lora(added)
        raise
    return added


def _merge_lora(added) -> None:
    """Fold every ``B @ A`` into its weight and remove the parametrizations (the weight keeps its Parameter object)."""
    for (mod, name), _ in added:
        if parametrize.is_parametrized(mod, name):
            parametrize.remove_parametrizations(mod, name, leave_parametrized=True)


def _check_separate(student: nn.Module, teacher: nn.Module) -> None:
    def storages(m):
        out = set()
        for t in list(m.parameters()) + list(m.buffers()):
            if not t.is_meta and t.numel():
                out.add((t.device, t.untyped_storage().data_ptr()))
        return out

    if any(p.is_meta for p in student.parameters()):
        raise GraphpruneError("the student has weights on 'meta': load or compile it with real weights before distilling")
    shared = storages(student) & storages(teacher)
    if shared:
        raise GraphpruneError("the student shares tensors with the teacher, and distill trains the student in place: give "
                              "graphprune's pruned copy (compile's result), not the model or a view of it")
