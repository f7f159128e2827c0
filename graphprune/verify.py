"""The self-check: a pruned model must compute what its dead twin computes.

The *dead twin* is the traced original with every removed unit zeroed in
every parameter slice of its group (producer rows, biases, norm affine,
loose parameters, consumer columns), and where a group is routed over (experts),
minus infinity written into the routing softmax at removed entries (``twin_graph``:
a removed expert is one no token goes to). Removing units whose slices are all
zero must change nothing, so the pruned model has to reproduce the twin;
where it does not, some op used the removed channels in a way no rule
accounted for, and the result would be silently wrong.

``compile`` runs the check on the example inputs and on a second input
shape (one more sample, and one token fewer for sequence inputs). On a
mismatch, bisection over groups finds the ones responsible; they are kept
whole and the model is pruned again. ``check_trace`` is the same idea at
ratio 0: the traced graph must equal the user's model before anything is
removed (in-place updates through aliases are invisible to symbolic
tracing).
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Mapping
import copy
import functools
import io
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.utils._python_dispatch
from torch.utils._pytree import tree_leaves, tree_map

from .modes import kept_modes
from .errors import GraphpruneError, first_line
from .flops import copied_inputs
from .meta_keys import PYTHON_STATE, SYMBOLIC_DIMS
from .attrs import (ATTR_DEPTH, MODULE_STATE, attribute_tensors, key_name, pairs, rebuilt, slots_of, tensor_name,
                    tensor_slots)
from .trace import shadow


@dataclass
class Verification:
    """What the self-check did, on ``result.report.verify``."""

    status: str  # "passed", "repaired", "skipped"
    why: str = ""  # why skipped
    inputs: list = field(default_factory=list)  # input shapes checked
    blocked: list = field(default_factory=list)  # groups kept whole after a mismatch, with their members
    seconds: float = 0.0
    notes: list = field(default_factory=list)  # what the user should know (a shape the traced graph does not take)

    def __str__(self) -> str:
        if self.status == "skipped":
            return f"verify skipped: {self.why}"
        more = f"; kept whole after a mismatch: {'; '.join(self.blocked)}" if self.blocked else ""
        notes = f"; note: {'; '.join(self.notes)}" if self.notes else ""
        return f"verify {self.status} on inputs {self.inputs} in {self.seconds:.2f}s{more}{notes}"


def flatten(out) -> list:
    """Every leaf of a (nested) model output, in a fixed order: tensors, and plain
    values (a width returned as an int must match too). Dataclasses and other
    objects are walked through their fields."""
    import dataclasses

    if isinstance(out, torch.Tensor) or out is None or isinstance(out, (bool, int, float, str, complex)):
        return [out]
    if isinstance(out, dict) or hasattr(out, "items"):
        return [t for k in out.keys() for t in flatten(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten(v)]
    if dataclasses.is_dataclass(out):
        return [t for f in dataclasses.fields(out) for t in flatten(getattr(out, f.name))]
    if hasattr(out, "__dict__"):
        return [t for k in sorted(vars(out)) for t in flatten(vars(out)[k])]
    return [out]


ULPS = 8  # in a half-precision output, a sum in another order moves it by a few units of its precision


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for outputs of ``dtype``: 1e-4 of the output's scale. In half precision
    that holds where a difference can be checked again in float32 (``widened_on_rounding``);
    elsewhere it is ``ULPS`` units of the dtype's precision. A bf16 ResNet-18 differs from its
    dead twin by 1.6 units of bf16 (0.047 at magnitude 3.8) for summing in another order, and at
    1e-4 every group "failed": ratio=0.5 kept 94% of its weights, and the deploy folds were
    refused outright. But 8 units of bf16 are 3%: a module form that took a mean over 6 of 8
    channels was 0.19 off at magnitude 5.7 and passed."""
    if not dtype.is_floating_point:
        return 0.0
    state = _HALF_CHECK.get()
    if dtype in HALF and (state is None or state.mode == "loose"):
        return max(1e-4, ULPS * torch.finfo(dtype).eps)
    return 1e-4


COLUMN_FLOOR = 1 / 16  # a column's scale is at least this share of its output's largest magnitude


def _column_scales(y: torch.Tensor, scale: float) -> torch.Tensor:
    """Each entry's scale for the absolute tolerance: the smallest, over the dims, of the largest
    magnitude in its slice along that dim (its row, its column, its channel), at least
    ``COLUMN_FLOOR`` of the whole output's. One output can hold values of different sizes: a
    detector's ``cat(boxes * 640, class probabilities)`` measured on its largest magnitude let the
    probabilities be 0.02 off with "verify passed" (survey 12). The floor keeps the tolerance where
    summing in another order can land (a slice that cancels to nearly zero)."""
    if y.dim() < 2 or not y.numel():
        return torch.tensor(scale)
    a = y.detach().float().abs().nan_to_num(0.0, 0.0, 0.0)
    out = torch.full_like(a, scale)
    for d in range(a.dim()):
        others = [k for k in range(a.dim()) if k != d]
        out = torch.minimum(out, a.amax(dim=others, keepdim=True))
    return out.clamp_min(scale * COLUMN_FLOOR)


def mismatch(got, ref, rtol: float = 0.0) -> str | None:
    """None if ``got`` reproduces ``ref`` to the precision of its dtype (or to ``rtol``, where
    coarser), else what differs. A difference in a half-precision output is noted for
    ``widened_on_rounding`` (which may run the check again in float32)."""
    try:
        bad = _mismatch(got, ref, rtol)
    except Exception as e:  # noqa: BLE001 - outputs that cannot be compared are not the same
        return f"the outputs cannot be compared ({type(e).__name__}: {first_line(e)[:120]})"
    return rounding_noted(bad, any(isinstance(y, torch.Tensor) and y.dtype in HALF for y in flatten(ref)))


HALF = (torch.float16, torch.bfloat16)


@dataclass
class _HalfCheck:
    mode: str  # "native": the model's dtype at float32's tolerance; "wide": float32 copies; "loose": ULPS
    seen: list = field(default_factory=list)  # differences found: in half precision (native), any (wide)


_HALF_CHECK: contextvars.ContextVar = contextvars.ContextVar("graphprune_half_check", default=None)


def rounding_noted(bad: str | None, half: bool) -> str | None:
    """``bad``, noted for ``widened_on_rounding`` where it is a difference of half-precision values."""
    state = _HALF_CHECK.get()
    if bad and state is not None and (half and state.mode == "native" or state.mode == "wide"):
        state.seen.append(bad)
    return bad


def widened_on_rounding(check):
    """``check`` (-> what is wrong, or None) with half-precision outputs held to float32's
    tolerance. Run first as it is; where its verdict is a difference in a half-precision output,
    run again with every half-precision tensor of the models it runs and of their inputs widened
    to float32 (``_run``): there rounding is small and a wrong rewrite is not, so that run's
    verdict stands. In bf16, summing in another order moves an output by a unit or two (1/128
    relative each), more than 1e-4; a tolerance of 8 units let a 3% error pass, and 8 units of
    a small column failed exact groups of a bf16 ViT, kept them whole and refused a budget its
    float32 weights met (survey 37 F05). Where float32 copies do not fit in memory, the model
    cannot run in float32 (a dtype written in its code, a torch.export graph, which checks its
    inputs' dtypes), or the pipeline computes new weights in the model's dtype (a fold, whose
    rounding float32 cannot take back: ``Verifier.computes_weights``), the check runs again at
    8 units.
    Any other verdict (a failure, a shape) stands."""
    @functools.wraps(check)
    def run(*args, **kwargs):
        if _HALF_CHECK.get() is not None:  # inside another such check: its mode holds
            return check(*args, **kwargs)
        native = _HalfCheck("native")
        bad = _in_mode(native, check, args, kwargs)
        if not bad or not any(s in str(bad) for s in native.seen):
            return bad
        if _fits_widened(args) and not any(getattr(a, "computes_weights", False) for a in args):
            wide = _HalfCheck("wide")
            try:
                again = _in_mode(wide, check, args, kwargs)
            except Exception:  # noqa: BLE001 - the model cannot run in float32
                again = "failed"
            if not again:
                return None
            if any(s in str(again) for s in wide.seen):  # it differs in float32 too
                return bad
        return _in_mode(_HalfCheck("loose"), check, args, kwargs)
    return run


def _widening() -> bool:
    state = _HALF_CHECK.get()
    return state is not None and state.mode == "wide"


def _runs_unwidened(fn, *args) -> bool:
    """Whether ``fn(*args)`` runs in its own dtypes (inside a widened check)."""
    try:
        _in_mode(_HalfCheck("loose"), fn, args, {})
        return True
    except Exception:  # noqa: BLE001
        return False


def _in_mode(state: _HalfCheck, check, args, kwargs):
    token = _HALF_CHECK.set(state)
    try:
        return check(*args, **kwargs)
    finally:
        _HALF_CHECK.reset(token)


def _fits_widened(args) -> bool:
    """Room for float32 copies of the half-precision weights of the modules among ``args``."""
    mods = [a for a in args if isinstance(a, torch.nn.Module)]
    tensors = list({id(t): t for m in mods for t in [*m.parameters(), *m.buffers()] if t.dtype in HALF}.values())
    return not tensors or _short_of_room(sum(4 * t.numel() for t in tensors), tensors[0].device) is None


def _widened_inputs(args: tuple, kwargs: dict, to: torch.dtype = torch.float32, of=HALF) -> tuple[tuple, dict]:
    """The inputs with their tensors of the dtypes ``of`` cast ``to`` a wider one."""
    wide = lambda t: t.to(to) if isinstance(t, torch.Tensor) and t.dtype in of else t  # noqa: E731
    return tree_map(wide, args), tree_map(wide, kwargs)


def _widened(fn, to: torch.dtype = torch.float32, of=HALF):
    """``fn``'s tensors of the dtypes ``of`` (half precision) swapped for copies in ``to`` (float32)
    while it runs (a module), or nothing."""
    if not isinstance(fn, torch.nn.Module):
        return contextlib.nullcontext()
    tensors = [*fn.parameters(), *fn.buffers(), *_plain_tensors(fn)]
    return swapped(fn, {id(t): t.detach().to(to) for t in tensors if t.dtype in of})


def _mismatch(got, ref, rtol: float = 0.0) -> str | None:
    a, b = flatten(got), flatten(ref)
    if len(a) != len(b):
        return f"{len(a)} output values instead of {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if not isinstance(y, torch.Tensor) or not isinstance(x, torch.Tensor):
            if type(x) is not type(y) or x != y:
                return f"output {i} is {x!r} instead of {y!r}"
            continue
        if x.shape != y.shape:
            return f"output {i} has shape {tuple(x.shape)} instead of {tuple(y.shape)}"
        if not y.is_floating_point():
            if not torch.equal(x, y):
                return f"output {i} differs"
            continue
        finite = y.abs()[torch.isfinite(y)]
        scale = float(finite.max()) if finite.numel() else 1e-30  # each output on its own scale
        tol = max(tolerance(y.dtype), rtol)
        close = (x.float() - y.float()).abs() <= tol * (_column_scales(y, scale) + y.float().abs())
        if not bool((close | (x.isnan() & y.isnan()) | (x == y)).all()):
            err = (x.float() - y.float()).abs().nan_to_num(float("inf")).max().item()
            nan = " (the reference has NaN or inf)" if finite.numel() < y.numel() else ""
            return f"output {i} differs by up to {err:.3g} (its largest magnitude {scale:.3g}){nan}"
    return None


@contextmanager
def evaluating(*modules):
    """Eval mode for the check, each submodule's own mode restored after.
    Exported modules refuse train()/eval(); they keep theirs."""
    with kept_modes(*modules):
        for mod in modules:
            try:
                mod.eval()
            except (NotImplementedError, RuntimeError):
                pass
        yield


def _run(fn, args, kwargs):
    """``fn(*args, **kwargs)`` under a fixed seed, on copies of the input tensors: a forward
    that normalises its input in place (``im /= 255``) divided the caller's example again at
    every check, and the model and its graph then disagreed on what they were given."""
    args, kwargs = copied_inputs(tuple(args), dict(kwargs or {}))
    wide = contextlib.nullcontext()
    if _widening():  # the check again in float32 (``widened_on_rounding``)
        args, kwargs = _widened_inputs(args, kwargs)
        wide = _widened(fn)
    # a GraphModule that raises prints the failing line of its generated code to stderr first:
    # the shapes a check tries and a graph may refuse filled a run that worked with tracebacks
    with wide, _seeded_generators(), _other_rngs(), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kwargs)


@contextmanager
def _seeded_generators():
    """torch's CPU generator and those of the CUDA devices in use seeded with 0, and put back after.
    Not ``torch.manual_seed``: it also seeds every device generator torch knows of, and where a
    device is not initialised (a CUDA build on a machine without a GPU, and always MTIA and XPU)
    it queues the seeding with the caller's formatted stack, 2.5 ms a call: 13% of compile on
    small models, which check on dozens of runs. It also reseeded the user's CUDA generator, left
    out of the fork, so a compile moved the user's GPU random stream."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(0)
        for d in devices:
            torch.cuda.default_generators[d].manual_seed(0)
        yield


@contextmanager
def _other_rngs():
    """numpy's and Python's generators seeded for a run and put back after: Wav2Vec2 draws its
    training-mode time masks from numpy, so two runs of one model drew different masks."""
    import random

    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(0)
    random.seed(0)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def other_inputs(args: tuple, kwargs: dict | None = None) -> list[tuple[tuple, dict]]:
    """Second inputs to check, as (args, kwargs): one more sample and one position fewer on
    dim 1 (a token or time step), then one more sample alone, in keyword tensors too
    (Whisper's ``decoder_input_ids`` stayed at the example's batch while its features grew,
    a mix the exported graph refused and the model took, so Whisper was refused), then one
    more sample in the positional inputs alone (a keyword tensor without a batch dim)."""
    kwargs = dict(kwargs or {})

    def grow(x):
        return torch.cat([x, x[:1]], 0) if isinstance(x, torch.Tensor) and x.dim() >= 1 else x

    def shorten(x):
        return x[:, :-1] if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] > 2 else x

    # through lists, tuples and dicts of tensors (an input given as [x] was checked at the example alone)
    out = [tree_map(lambda a: shorten(grow(a)), (tuple(args), kwargs)), tree_map(grow, (tuple(args), kwargs)),
           (tree_map(grow, tuple(args)), kwargs)]
    return [o for i, o in enumerate(out) if not any(_same(o, p) for p in out[:i])]


def resized_inputs(args: tuple, kwargs: dict) -> list[tuple[tuple, dict]]:
    """Inputs at other sizes besides the batch, in the order they are tried (``Verifier._cases``
    checks the first the traced graph takes, then each later one that varies a dim none of those
    did): every non-batch dim of the first input made smaller at once, then every dim after its
    dim 1 (an image's height and width), then each of its dims alone (a spectrogram's time with
    its mel bins fixed, a video's frames), then each dim of every other tensor input alone. A
    size changes in every dim of every other tensor input that has it, so a mask or a position
    table follows its sequence. Each size first loses one, then half the largest power of two
    dividing it (what strided down-sampling and up-sampling that must meet again keep), as a
    64-pixel image becomes 63, else 32. Last, an image's height and width swapped, where they
    differ. A number computed from a pruned width and a run-time size (``e / (c * h * w)``) was
    frozen at the example's size and wrong at every other, while the batch-only check passed;
    with the height never varied, a non-square image's frozen height passed too."""
    leaves = [a for a in tree_leaves((tuple(args), dict(kwargs))) if isinstance(a, torch.Tensor)]
    first = next((a for a in leaves if a.dim() >= 2), None)
    if first is None:
        return []
    shape = tuple(first.shape)
    plans = [(None, shape[1:]), (None, shape[2:])]  # (the one input cut by position, or None; sizes cut by value)
    plans += [((id(first), d), ()) for d in range(1, len(shape))]
    plans += [((id(t), d), ()) for t in leaves if t is not first for d in range(1 if t.dim() >= 2 else 0, t.dim())]
    out, seen = [], set()
    for (where, sizes) in plans:
        for smaller in (lambda s: s - 1, lambda s: s - max(1, (s & -s) // 2)):
            new = {s: smaller(s) for s in sizes if smaller(s) >= 1}
            at = None
            if where is not None:
                t = next(t for t in leaves if id(t) == where[0])
                if smaller(t.shape[where[1]]) < 1:
                    continue
                at = (where[0], where[1], smaller(t.shape[where[1]]))
            if not new and at is None:
                continue

            def cut(x, new=new, at=at):
                if not isinstance(x, torch.Tensor):
                    return x
                if at is not None:  # this input's one dim; other inputs follow its size by value
                    if id(x) == at[0]:
                        return x.narrow(at[1], 0, at[2])
                    old = next(t for t in leaves if id(t) == at[0]).shape[at[1]]
                    return cut_sizes(x, {old: at[2]})
                return cut_sizes(x, new)

            case = tree_map(cut, (tuple(args), dict(kwargs)))
            key = tuple(tuple(t.shape) for t in tree_leaves(case) if isinstance(t, torch.Tensor))
            if key in seen:
                continue
            seen.add(key)
            out.append(case)
    if first.dim() >= 4 and shape[-2] != shape[-1]:  # a landscape image turned portrait: its last two dims swapped
        # every cut above keeps the example's order of height and width, so `if H < W` (a tiling, a rotation to
        # landscape) was never crossed: the module form, reading pruned channels past it, was 0.15 off (survey 44 F3)
        out.append(tree_map(lambda t: t.transpose(-2, -1).contiguous() if t is first else t, (tuple(args), dict(kwargs))))
    return out


def cut_sizes(x: torch.Tensor, new: dict) -> torch.Tensor:
    """``x`` with every dim of a size in ``new`` narrowed to its new size (each read before it is cut)."""
    for d in range(x.dim()):
        if x.shape[d] in new:
            x = x.narrow(d, 0, new[x.shape[d]])
    return x


def varied(case: tuple, example: tuple) -> set:
    """(input, dim) pairs whose size ``case`` changed from ``example``'s."""
    a = [t for t in tree_leaves(case) if isinstance(t, torch.Tensor)]
    b = [t for t in tree_leaves(example) if isinstance(t, torch.Tensor)]
    return {(i, d) for i, (x, y) in enumerate(zip(a, b)) if x.dim() == y.dim() for d in range(x.dim())
            if x.shape[d] != y.shape[d]}


def _same(a: tuple, b: tuple) -> bool:
    return all((x.shape == y.shape) if isinstance(x, torch.Tensor) else x is y
               for x, y in zip(tree_leaves(a), tree_leaves(b)))


def _shapes(args: tuple) -> list:
    return [tuple(a.shape) for a in tree_leaves(tuple(args)) if isinstance(a, torch.Tensor)]


def why_not(model: torch.nn.Module) -> str | None:
    """Why the self-check cannot run on ``model`` (weights on meta, or too large to copy), or None."""
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_meta for t in tensors):
        return "the model's weights are on the meta device"
    size = sum(t.numel() * t.element_size() for t in tensors)
    free = _short_of_room(size, tensors[0].device if tensors else torch.device("cpu"))
    if free is not None:
        return f"a copy of the weights ({size / 2**30:.1f} GiB) does not fit in free memory ({free / 2**30:.1f} GiB)"
    return None


def _short_of_room(nbytes: int, device: torch.device) -> int | None:
    """The free bytes on ``device`` where two copies of ``nbytes`` do not fit in them, else None
    (also where free memory cannot be read): the margin every copy the check makes keeps."""
    free = _free_bytes(device)
    return free if free is not None and 2 * nbytes > free else None


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@contextmanager
def swapped(root: torch.nn.Module, new: dict):
    """Run with tensors replaced ({id(old tensor): new tensor}) in every module slot
    that holds them, each slot once, then put the originals back. Unlike
    ``functional_call`` this is right for tied tensors and for a module
    registered under two names (the traced graph shares the user's modules)."""
    done = []
    try:
        for mod in root.modules():  # each module object once
            for store in (mod._parameters, mod._buffers):
                for k, t in list(store.items()):
                    if isinstance(t, torch.Tensor) and id(t) in new:
                        done.append((store, k, t))
                        store[k] = new[id(t)]
            for store, k, held in tensor_slots(mod.__dict__, skip=MODULE_STATE):
                if isinstance(held, torch.Tensor):
                    if id(held) in new:
                        done.append((store, k, held))
                        store[k] = new[id(held)]
                elif any(isinstance(v, torch.Tensor) and id(v) in new for v in held):  # a tuple: rebuilt around them
                    done.append((store, k, held))
                    store[k] = rebuilt(held, [new.get(id(v), v) if isinstance(v, torch.Tensor) else v for v in held])
        yield
    finally:
        for store, k, t in reversed(done):
            store[k] = t


def _copies(*mods, params: bool = True, keep: dict | None = None) -> dict:
    """Copies of every buffer and plain tensor attribute, and of every parameter unless ``params=False``: a
    forward that writes to its weights (Embedding max_norm, ``w.data.clamp_()``,
    step counters) writes to these. ``check_trace`` finds out whether the model
    writes to its parameters at all; most do not, and large ones then skip the copy. ``keep``: copies
    already made ({id: copy}) to use for those tensors instead of new ones."""
    keep = keep or {}
    return {id(t): keep[id(t)] if id(t) in keep else t.detach().clone() for m in mods
            for t in [*(m.parameters() if params else ()), *m.buffers(), *_plain_tensors(m)]}


def _named_plain_tensors(model: torch.nn.Module) -> list:
    """[(name, tensor)] of ``attrs.attribute_tensors``, for what a check says a forward wrote: an EMA a forward
    advanced in ``self.st["ema"]`` was not among what it wrote, so its trace, which ran ``mul_(0.9)`` once while
    tracing and kept only the ``add_``, was never called twice, and came back 0.07 off from its second call (survey 63)."""
    return [(tensor_name(path, k, keys), t) for path, k, keys, t in attribute_tensors(model)]


def _plain_tensors(model: torch.nn.Module) -> list:
    """Tensors modules hold as plain attributes (a step counter or an EMA kept as ``self.calls``, not
    a buffer), also in a list, tuple or dict attribute (``self.ema["mean"]``, ``self.hist[0]``): a
    forward that updates them in place changed the user's model while compile ran it (survey 31 f05)."""
    return [t for mod in model.modules() for _, _, v in tensor_slots(mod.__dict__, skip=MODULE_STATE)
            for t in ([v] if isinstance(v, torch.Tensor) else [t for t in v if isinstance(t, torch.Tensor)])]


# The walks over attributes skip what every module keeps (``attrs.MODULE_STATE``): swapped and _plain_tensors were
# 16% of a cProfile of a default ResNet-152 compile, out of its top 25 after; in wall-clock time the forwards hide it


@contextmanager
def on_copies(*mods, params: bool = True):
    """Run ``mods`` on copies of their tensors (see ``_copies``); the originals are put back after,
    and so are the plain values their forwards rebind (``_plain_values``). The copies are made on
    entering, of what the modules hold then: made when called, they were swapped in before a
    context listed earlier in the same ``with`` (the dead twin's ``swapped``) had run, and
    that context then found none of the tensors it replaces, so the "dead twin" was the original.

    Without ``params`` the weights are shared, under the guard that stops a write into them before
    it happens (``_NoParamWrites``): ``check_trace`` saw no write at the example, but a forward may
    write at another size (``if x.shape[0] > 4: w.data.mul_(0.5)`` halved the user's weights at the
    tested batch 5, survey 31 f01). The guard's exception leaves every check; the public entry
    points then run again with every check on copies (``retried_on_weight_writes``)."""
    from contextlib import ExitStack

    params = params or _COPY_WEIGHTS.get()
    with ExitStack() as stack:
        for m in mods:
            stack.enter_context(swapped(m, _copies(m, params=params)))
            stack.enter_context(_plain_values(m))
        if not params:
            stack.enter_context(_NoParamWrites([t for m in mods for t in m.parameters()]))
        yield


_COPY_WEIGHTS = contextvars.ContextVar("graphprune_copy_weights", default=False)


@contextmanager
def copying_weights():
    """Every run of the checks on copies of the weights too (``on_copies``, ``check_trace``)."""
    token = _COPY_WEIGHTS.set(True)
    try:
        yield
    finally:
        _COPY_WEIGHTS.reset(token)


def retried_on_weight_writes(fn):
    """``fn`` (compile, search, export) run again with every check on copies of the weights where a
    check's forward tried to write into shared ones (``_ParamWrite``, stopped before the write)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if _COPY_WEIGHTS.get():
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except _ParamWrite:
            with copying_weights():
                return fn(*args, **kwargs)
    return run


@contextmanager
def _plain_values(root: torch.nn.Module):
    """Put back every plain attribute a run rebinds or adds (``self.calls += 1``, a cached
    ``self.last = h``), and the contents of the lists, dicts, sets and namespaces it changes in
    place (``self.state["step"] += 1``, ``self.feats.append(h)``): the checks ran the result twice
    and left its step counter at 2, so a forward that warms up over its first calls was off by 0.15
    on the user's first ones (survey 18); a counter in a dict came back at 3, three calls early into
    its next phase (survey 54 F2)."""
    saved = plain_state(root)
    try:
        yield
    finally:
        restore_plain_state(saved)


def plain_state(root: torch.nn.Module) -> list:
    """What a forward may change outside its tensors, to compare or put back: each module's
    ``__dict__`` and, ``ATTR_DEPTH`` levels into it, every list, dict, set, ``SimpleNamespace`` and
    dataclass, each with a shallow copy of its contents."""
    out, seen = [], set()

    def walk(v, depth, name):
        if isinstance(v, (torch.Tensor, torch.nn.Module)) or id(v) in seen:
            return
        if isinstance(v, tuple):
            for i, t in enumerate(v if depth > 0 else ()):
                walk(t, depth - 1, f"{name}[{i}]")
            return
        inner = v if isinstance(v, set) else slots_of(v)
        if inner is None:
            return
        seen.add(id(v))
        try:
            out.append((inner, copy.copy(inner), name))
        except Exception:  # noqa: BLE001 - a container whose items cannot be read: not put back
            return
        if depth > 0 and not isinstance(inner, set):
            for k, t in pairs(inner):
                walk(t, depth - 1, f"{name}[{key_name(k)}]" if inner is v else f"{name}.{k}")

    mods = {}
    for path, mod in root.named_modules(remove_duplicate=False):
        mods.setdefault(id(mod), (path, mod))
    for path, mod in mods.values():
        prefix = f"{path}." if path else ""
        out.append((mod.__dict__, dict(mod.__dict__), prefix))
        for k, v in mod.__dict__.items():
            if k not in MODULE_STATE:
                walk(v, ATTR_DEPTH, prefix + k)
    return out


def _differs(now, before) -> bool:
    if isinstance(now, set):
        return now != before
    if len(now) != len(before):
        return True
    if isinstance(now, Mapping):  # a dict, or a slotted dataclass's fields (attrs.SlotFields)
        return any(k not in before or before[k] is not v for k, v in now.items())
    return any(a is not b for a, b in zip(now, before))


def plain_state_changed(saved: list) -> list[str]:
    """The attributes (by name, where a module's own) and the containers whose contents differ from
    ``saved`` (``plain_state``): a run changed Python state its trace may hold as the first call's."""
    changed = []
    for now, before, name in saved:
        if not _differs(now, before):
            continue
        if "_parameters" in before:  # a module's __dict__: by attribute, internals left out
            changed += [name + k for k in sorted(set(now) | set(before), key=str)
                        if k not in MODULE_STATE and now.get(k, _MISSING) is not before.get(k, _MISSING)]
        else:
            changed.append(name)
    return changed


def restore_plain_state(saved: list) -> None:
    for now, before, _ in saved:
        if not _differs(now, before):
            continue
        if isinstance(now, list):
            now[:] = before
        else:
            now.clear()
            now.update(before)


_MISSING = object()


def _writes(pairs: list) -> bool:
    """Whether a run wrote to any of the copies it ran on ((original, copy) pairs). Values
    are compared: a write through ``.data`` does not bump the version counter."""
    return any(not torch.equal(orig, copy) for orig, copy in pairs)


class _ParamWrite(BaseException):
    """Raised before an op writes to a parameter under ``_no_param_writes``. A BaseException, so
    that no ``except Exception`` in the user's forward swallows it and lets the write go on."""


class _NoParamWrites(torch.utils._python_dispatch.TorchDispatchMode):
    """Refuses, before it runs, every op that writes into the storage of one of ``tensors``
    (``w.data.clamp_()``, an Embedding's ``max_norm`` renorm, ``out=`` into a weight, a view's
    ``zero_()``): the schema says which arguments an op writes. A forward that rebinds a
    weight's data (``w.data = w.data.clamp(-0.1, 0.1)``, WGAN's weight clipping) runs no op
    on it: on leaving, each tensor holding other data is given its own back, and the run
    counts as a write (it clipped the user's weights, survey 31 f09)."""

    def __init__(self, tensors):
        super().__init__()
        self.tensors = list({id(t): t for t in tensors}.values())
        self.ptrs = {t.untyped_storage().data_ptr() for t in self.tensors} - {0}

    def __enter__(self):
        self.held = [(t, t.data) for t in self.tensors]  # the data each holds: put back if rebound
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        rebound = [(t, data) for t, data in self.held if t.data.data_ptr() != data.data_ptr() or t.shape != data.shape]
        for t, data in rebound:
            t.data = data
        self.held = []
        if rebound and exc[0] is None:
            raise _ParamWrite("a weight's data rebound")
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.is_mutable:
            given = [*zip(func._schema.arguments, args), *((a, kwargs[a.name]) for a in func._schema.arguments
                                                            if a.name in kwargs)]
            for arg, value in given:
                written = arg.alias_info is not None and arg.alias_info.is_write
                for t in (value if isinstance(value, (list, tuple)) else (value,)):
                    if written and isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.ptrs:
                        raise _ParamWrite(func)
        return func(*args, **kwargs)


ParamWrite = _ParamWrite  # what a guarded run raises where the forward would write (``Pruner`` catches it)


class _Retry(Exception):
    """The run without copies of the weights could not say: run again with them."""


def check_trace(model, gm, args: tuple, kwargs: dict) -> tuple[str | None, bool]:
    """None if the traced graph computes what ``model`` computes on the example,
    else what differs, and whether the forward writes to its parameters. Both run
    on copies of their buffers, so a forward that updates state (running statistics,
    counters) leaves the user's model as it was. The weights are shared, under a guard
    that refuses any write into them before it happens (``_NoParamWrites``): most
    forwards write none, and copying them for the check was a full copy of the model
    (vit_h_14: 2.5 GB, 3 s). Where the guard trips, or the guarded run fails for any
    reason, the check is run again on copies of the weights too, which a forward that
    renormalises its embeddings may write to. Where the model's first call wrote to its
    tensors, both are called a second time, on other values, carrying that state
    (``_again``): a one-time initialisation guarded by a buffer flag was traced as
    taken on every call, and the graph recomputed its scale from each batch, 0.25
    off from the second call on (survey 18)."""
    try:
        if _COPY_WEIGHTS.get():
            raise _Retry  # the forward writes at some size: no run shares the weights
        return _check_trace(model, gm, tuple(args), kwargs, guarded=True)
    except (_ParamWrite, _Retry):
        return _check_trace(model, gm, tuple(args), kwargs, guarded=False)


def _check_trace(model, gm, args: tuple, kwargs: dict, *, guarded: bool) -> tuple[str | None, bool]:
    weights = list({id(t): t for m in (model, gm) for t in m.parameters()}.values())
    guard = (lambda: _NoParamWrites(weights)) if guarded else contextlib.nullcontext
    mine = _copies(model, params=not guarded)
    plain_named = _named_plain_tensors(model)
    state = [(n, t, mine[id(t)]) for n, t in [*model.named_parameters(), *model.named_buffers(), *plain_named]
             if id(t) in mine]
    again, written, changed, hooked = None, [], [], False
    with evaluating(model, gm):
        with swapped(model, mine):
            plain = plain_state(model)
            try:
                with guard():
                    ref = _run(model, args, kwargs)
            except Exception as e:  # noqa: BLE001 - the user's own forward: say so instead of a raw traceback
                if guarded:
                    raise _Retry from e
                raise GraphpruneError(f"{type(model).__name__} fails on its example inputs {_shapes(args)} "
                                      f"({type(e).__name__}: {first_line(e)[:200]}); pass inputs the model "
                                      "takes") from e
            written = [n for n, orig, copy in state if not torch.equal(orig, copy)]
            changed = plain_state_changed(plain)  # Python state (``self.step += 1``): a trace runs Python once
            gm.meta[PYTHON_STATE] = changed
            hooked = _hooked(model)
            if written or changed or hooked:
                again = _again(args, kwargs)
                try:
                    with guard():
                        ref2 = _run(model, *again)
                except Exception:  # noqa: BLE001 - it does not take those values: the first call is all there is
                    again = None
        # the graph shares the model's parameters: the copies the model's run left as they were serve the graph's
        # run too, so a model is copied once, not twice (regnet_y_128gf: 2.6 GB and 3 s less)
        # (where it wrote, a second call ran, and nothing is shared; an output that is a view of a copy is taken
        # apart from it first)
        shared = {} if written or guarded else {id(t): mine[id(t)] for t in model.parameters()}
        if shared:
            ref = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, ref)
        theirs = _copies(gm, keep=shared, params=not guarded)
        copies = {**mine, **theirs}
        params = [] if guarded else list({id(t): (t, copies[id(t)]) for t in weights}.values())
        with swapped(gm, theirs):
            try:
                with guard():
                    got = _run(gm, args, kwargs)
                    got2 = _run(gm, *again) if again is not None else None
            except Exception as e:  # noqa: BLE001 - a trace that cannot run is a trace that differs
                if guarded:
                    raise _Retry from e
                return f"the traced graph fails where the model runs ({type(e).__name__}: {first_line(e)[:200]})", \
                    _writes(params)
    bad = mismatch(got, ref)
    if bad is None and again is not None:
        bad = mismatch(got2, ref2)
        if bad and written:
            plain = {n for n, _ in plain_named} & set(written)
            bad = (f"on a second call, after the first wrote {', '.join(written[:4])}, {bad}: the trace took the first "
                   "call's path for good" + (f" ({', '.join(sorted(plain)[:3])}: a tensor held as a plain attribute, not "
                                             "a buffer, which a trace takes for a constant)" if plain else ""))
        elif bad and changed and not hooked:
            bad = (f"on a second call, after the first changed {', '.join(map(str, changed[:4]))}, {bad}: the trace "
                   "holds what the first call's Python state made of it (a tracer runs the Python of a forward once)")
        elif bad:
            bad = (f"on a second call with other values, {bad}: the trace holds a value of an earlier call (a hook "
                   "wrote what the forward reads, and fx runs no hook while it traces)")
    return bad, _writes(params)


def _hooked(model: torch.nn.Module) -> bool:
    """Whether a forward hook runs in ``model``: one that stores a module's output where the forward
    reads it (``self.feats["c1"] = out``) does not run while fx traces, which kept the stored tensor
    of the user's last call as a constant, right at that call's input only (survey 39 f04)."""
    from .canon import _hooks

    return any(_hooks(m, backward=False) for m in model.modules())


def wrong_at_tested_batches(model, gm, args: tuple, kwargs: dict, params: bool = True) -> str | None:
    """What differs between ``model`` and its trace at the batch sizes the code tests
    (``source.batch_sizes``), or None. A tracer that answered a question about a value wrongly
    (``type(h) is torch.Tensor``, ``hasattr``, ``is_fx_tracing()``) never met the size test
    behind it, put no bound on the batch, and matched the model at the example: from batch 5 the
    graph was 0.11 off (survey 20). torch.export puts no guard on a batch of 1 (``if x.shape[0]
    == 1:``), and its graph was 0.30 off there (survey 21); nor on any other symbolic dim of 1
    (``at_size_one``). A size the graph refuses is no
    mismatch: it says so itself. Runs are on copies: what a forward writes is put back (of the
    weights too where ``params``: ``check_trace`` says whether the forward writes to them)."""
    from . import source

    cases = [(f"at batch {size}, a size the code tests (or 1, which torch.export never guards)", a, k)
             for size, a, k in source.tested_batches(model, args, kwargs, one=True)]
    cases += at_size_one(args, kwargs, gm.meta.get(SYMBOLIC_DIMS))
    for what, a, k in cases:
        with evaluating(model, gm):
            try:
                with on_copies(model, params=params):
                    ref = _run(model, a, k)
            except Exception:  # noqa: BLE001 - the model does not take it either
                continue
            try:
                with on_copies(gm, params=params):
                    got = _run(gm, a, k)
            except Exception:  # noqa: BLE001 - the graph refuses it, loudly
                continue
        bad = mismatch(got, ref)
        if bad:
            return f"{what}, {bad}: the trace did not take the path the code takes there"
    return None


def at_size_one(args: tuple, kwargs: dict, symbolic: list | None) -> list[tuple[str, tuple, dict]]:
    """(what, args, kwargs): the example with the dims of one symbol of the exported graph at 1, for
    each symbol but the batch's (``source.tested_batches`` tries a batch of 1). torch.export takes
    a symbolic size for 2 or more and guards no test of 1: ``if x.shape[1] == 1`` (one token, one
    frame) ran the other branch in a graph traced at 8 tokens, 0.48 off the model at 1 (survey 30 f13).
    The batch's symbol is the one at dim 0 of the first tensor of the most dims (``batches.example_batch``);
    a dim 0 of another input is no batch: a ``(T,)`` position input beside a ``(B, T, D)`` batch, tested
    ``pos.shape[0] == 1``, left a graph 0.20 off the model at one token."""
    return [(f"at size 1 of {_named(dims)} (torch.export never guards a size of 1)", *symbol_at(args, kwargs, dims, 1))
            for dims, _ in _other_symbols(args, kwargs, symbolic)]


def at_twice(args: tuple, kwargs: dict, symbolic: list | None, bounded: list | None = None) -> list[tuple[str, tuple, dict]]:
    """(what, args, kwargs): the example with the dims of one symbol of the exported graph at twice its
    size (the values repeated), for each symbol but the batch's, where the graph's bounds take it. Every
    other size the self-check tries is smaller than the example's or at a bound, and a forward that
    reads a pruned width against a length with no test in between (``h / min(h.shape[-1], T)``) agrees
    with its twin up to the pruned width: 16 wide from 32, 0.02 off it from 17 tokens on (survey 44 F2)."""
    highs = {tuple(dims): hi for _, hi, dims in bounded or [] if hi is not None}
    return [(f"at twice the size of {_named(dims)}", *symbol_at(args, kwargs, dims, 2 * n))
            for dims, n in _other_symbols(args, kwargs, symbolic) if 2 * n <= highs.get(tuple(dims), 2 * n)]


def main_index(tensors: list) -> int | None:
    """Which of ``tensors`` is the main input, whose dim 0 is the batch: the first of the most dims
    (``batches.example_batch`` reads the batch so), or None where none has a dim."""
    sized = [n for n, t in enumerate(tensors) if t.dim() >= 1]
    return max(sized, key=lambda n: tensors[n].dim()) if sized else None


def _other_symbols(args: tuple, kwargs: dict, symbolic: list | None) -> list[tuple[list, int]]:
    """(dims, the example's size) of each symbol of ``symbolic`` but the batch's (``at_size_one``)."""
    tensors = [t for t in tree_leaves((tuple(args), dict(kwargs))) if isinstance(t, torch.Tensor)]
    main = main_index(tensors)
    return [(dims, tensors[dims[0][0]].shape[dims[0][1]]) for dims in symbolic or []
            if (main, 0) not in dims and all(i < len(tensors) and d < tensors[i].dim() for i, d in dims)]


def _named(dims: list) -> str:
    return ", ".join(f"dim {d} of input {i}" for i, d in dims[:3])


def symbol_at(args: tuple, kwargs: dict, dims: list, size: int) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with every input dim of one symbol (``dims``: [(tensor index, dim)], a mask
    following its sequence) at ``size``, its values repeated in turn where it grows."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    leaves, spec = tree_flatten((tuple(args), dict(kwargs)))
    tensors = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
    for i, d in dims:
        t = leaves[tensors[i]]
        leaves[tensors[i]] = t.index_select(d, torch.arange(size, device=t.device) % t.shape[d])
    return tree_unflatten(leaves, spec)


def _again(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Other values of the same shapes for a second call: floating inputs halved (ids and masks kept)."""
    return tree_map(lambda t: t * 0.5 if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                    (tuple(args), dict(kwargs or {})))


def fill_entries(x: torch.Tensor, dim: int, idx: list, value: float) -> torch.Tensor:
    """``x`` with ``value`` at indices ``idx`` of ``dim`` (the twin's removed routing entries)."""
    return x.index_fill(dim, torch.as_tensor(idx, dtype=torch.long, device=x.device), value)


class Verifier:
    """Checks pruned models of one ``Pruner`` against their dead twins."""

    def __init__(self, p, extra=None):
        self.p = p
        self.extra = extra  # (removed, pruned graph) -> what else is wrong, or None (``api._module_paths``)
        args, kwargs = p.example_inputs, dict(p.example_kwargs or {})
        self.cases = [(tuple(args), kwargs)]
        self.others = other_inputs(tuple(args), kwargs)  # tried in order until the model takes one
        self.resized = resized_inputs(tuple(args), kwargs)  # ... and of these, the first the traced graph takes
        self.seconds = 0.0
        self._sized: list = []  # the resized cases tried (one stays in ``cases``)
        self.notes: list[str] = []
        self.refused: list = []  # (args, kwargs) the model takes and the traced graph does not
        self.unsized: list = []  # (args, kwargs) at another size the exported graph refuses (fixed dims): said elsewhere
        gm = p.gm
        self.params = dict(gm.named_parameters(remove_duplicate=False))
        # a fold writes weights rounded to the model's dtype: no float32 check of a half model (``widened_on_rounding``)
        from .pass_manager import computes_weights

        self.computes_weights = computes_weights(p.pipeline or "default")

    def _graph_refused(self, args, kwargs) -> None:
        """The traced graph does not take this shape; if the model does, say so:
        the result is specialized to the example's shape (torch.export guards)."""
        model = shadow(self.p.model)
        try:
            with evaluating(model), on_copies(model, params=self.p.param_writes):
                _run(model, args, kwargs)
        except Exception:  # noqa: BLE001 - the model does not take it either: nothing lost
            return
        self.refused.append((args, kwargs))
        self.notes.append(f"the model takes inputs {_shapes((args, kwargs))} but the traced graph ({self.p.analysis.method}) "
                          f"does not, so a graph result only takes the example's shapes {_shapes(self.cases[0])} (the "
                          "model's own classes take every size the model does)")

    def _cases(self):
        """The example, the first other batch shape the model accepts, and the first input at
        another size (``resized_inputs``) the traced graph takes (found on the first check)."""
        yield from list(self.cases)
        while self.others and len(self.cases) == 1:
            case = self.others.pop(0)
            self.cases.append(case)
            yield case
        covered = set().union(*(varied(c, self.cases[0]) for c in self.cases if any(c is t for t in self._sized)))
        while self.resized:  # each size a case the graph takes varies, until none is new
            case = self.resized.pop(0)
            if not varied(case, self.cases[0]) - covered:
                continue
            self._sized.append(case)
            self.cases.append(case)
            yield case
            if any(c is case for c in self.cases):  # the traced graph took it
                covered |= varied(case, self.cases[0])

    def twin_state(self, removed: dict) -> dict:
        """Zeroed copies of every parameter slice of the removed units ({id(original): copy}).
        Buffers keep their values: a running mean or a position table is what the
        model computes with, removed channel or not."""
        state: dict = {}
        groups = {g.id: g for g in self.p.analysis.groups}
        for gid, units in removed.items():
            g = groups[gid]
            dead = np.zeros(g.n_units, dtype=bool)
            dead[units] = True
            slices = [(s, dead) for s in g.params]
            if g.part_of is not None:  # a key/value head dies with the last query head it serves
                slices += [(s, np.bincount(g.part_of[~dead], minlength=g.n_parts) == 0) for s in g.shared_params]
            for s, gone in slices:
                if s.name not in self.params:
                    continue  # a constant that is neither parameter nor buffer: the twin cannot zero it
                orig = self.params[s.name]
                t = state.get(id(orig))
                if t is None:
                    t = state[id(orig)] = orig.detach().clone()
                idx = torch.as_tensor(np.flatnonzero(gone[s.unit_of]), device=t.device)
                t.index_fill_(s.axis, idx, 0.0)
        return state

    def twin_graph(self, removed: dict) -> torch.nn.Module:
        """The traced graph, with minus infinity written into the removed entries of every
        routing dim (``Group.fills``, from ``canon.mark_gates``): a removed expert is one no
        token is routed to, which zeroed weights cannot say. The graph itself where no
        removed group has fills."""
        fills = [(g, removed[g.id], dim, f) for g in self.p.analysis.groups if len(removed.get(g.id, ())) for dim, f in g.fills.items()]
        gm = self.p.gm
        if not fills:
            return gm
        graph = torch.fx.Graph()
        graph._codegen = copy.deepcopy(gm.graph._codegen)
        env: dict = {}
        graph.output(graph.graph_copy(gm.graph, env))
        for g, units, dim, (node, axis, value) in fills:
            dead = np.zeros(g.n_units, dtype=bool)
            dead[units] = True
            idx = np.flatnonzero(dead[g.dims[dim]]).tolist()
            user = env[node]
            src = user.args[0]
            with graph.inserting_before(user):
                filled = graph.call_function(fill_entries, (src, axis, idx, value))
            user.args = (filled, *user.args[1:])
        return torch.fx.GraphModule(gm, graph)

    @widened_on_rounding
    def check(self, removed: dict, out: torch.nn.Module) -> str | None:
        """None if ``out`` (``removed`` pruned away) reproduces the twin on every case."""
        start = time.perf_counter()
        self.p._buffers0.restore()  # the twin runs on the traced copy's buffers as the pruned model got them
        try:
            state = self.twin_state(removed)
            gm = self.twin_graph(removed)
            with evaluating(gm, out):
                def twin(args, kwargs):
                    with swapped(gm, {**_copies(gm, params=self.p.param_writes), **state}):
                        return _run(gm, args, kwargs)

                for case in self._cases():
                    args, kwargs = case
                    try:
                        ref = twin(args, kwargs)
                    except Exception:  # noqa: BLE001 - only a later shape can fail: the graph does not take it
                        if _widening() and _runs_unwidened(twin, args, kwargs):
                            raise  # the graph runs in its own dtype, not in float32: ``widened_on_rounding`` checks otherwise
                        # by identity of the case: every keyword-only case has the same empty args tuple
                        self.cases = [c for c in self.cases if c is not case]
                        if not any(c is case for c in self._sized):  # an exported graph fixes those sizes, and says so
                            self._graph_refused(args, kwargs)
                        else:  # ... but the module form takes them, and is held to its twin there (``module_form.beyond``)
                            self.unsized.append((args, kwargs))
                        continue
                    try:
                        with on_copies(out, params=self.p.param_writes):
                            got = _run(out, args, kwargs)
                    except Exception as e:  # noqa: BLE001 - a pruned model that fails where the twin runs is wrong
                        return f"the pruned model fails on inputs {_shapes(args)}: {type(e).__name__}: {e}"
                    bad = mismatch(got, ref)
                    if bad:
                        return f"on inputs {_shapes(args)}: {bad}"
            if self.extra is None:
                return None
            state = gm = ref = got = None  # the twin's copies go before the module form makes its own (a large model twice)
            # ``fatal``: sizes the model takes and the graph refuses, which no graph result may be returned with
            return self.extra(removed, out, self.refused + self.unsized, fatal=bool(self.refused))
        finally:
            self.seconds += time.perf_counter() - start

    def culprits(self, removed: dict) -> list[int]:
        """Group ids whose removal alone breaks the twin, by bisection (a set that
        fails while each half passes is returned whole)."""
        def bad(ids: list) -> list:
            if not ids:
                return []
            sub = {i: removed[i] for i in ids}
            if self.check(sub, self.p.prune(sub, fit=False)) is None:
                return []
            if len(ids) <= 1:
                return ids
            found = bad(ids[: len(ids) // 2]) + bad(ids[len(ids) // 2:])
            return found or ids
        return bad(sorted(i for i, u in removed.items() if len(u)))

    def describe(self, gid: int) -> str:
        g = next(g for g in self.p.analysis.groups if g.id == gid)
        names = sorted({s.name.rpartition(".")[0] or s.name for s in g.params})
        ops = sorted({d[0].name for d in g.dims if hasattr(d[0], "name")})
        return f"group {gid} ({g.n_units} units; parameters of {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}; ops {', '.join(ops[:6])}{' ...' if len(ops) > 6 else ''})"


def refused_sizes(note: str) -> str:
    """The error for a graph that refuses input sizes the model takes, and nothing else to return."""
    return (f"{note}. A pruned model that fails where the original works is not returned: give the forward "
            "no Python branch on input shapes (torch.export had to specialize one), or pass verify=False to accept "
            "a model for these input shapes only.")


def verified(p, decide, *, rounds: int = 4, extra=None):
    """Prune by ``decide()`` (-> removal), check against the twin (and ``extra``: see
    ``Verifier``), and on a mismatch keep the responsible groups whole and decide again.
    Returns (model, removal, Verification)."""
    reason = why_not(p.model)
    p.runtime_checked = reason is None
    removed = decide()
    out = p.prune(removed, fit=False)
    if reason:
        return out, removed, Verification("skipped", reason)
    v = Verifier(p, extra)
    blocked = []
    for _ in range(rounds):
        problem = v.check(removed, out)
        if v.notes and extra is None:  # with ``extra``, the module form is held to its twin there (api: or refused)
            raise GraphpruneError(refused_sizes(v.notes[0]))
        if problem is None:
            return out, removed, Verification("repaired" if blocked else "passed", inputs=[_shapes((a, k)) for a, k in v.cases],
                                              blocked=blocked, seconds=v.seconds, notes=v.notes)
        bad = v.culprits(removed)
        if not bad:
            break
        blocked += [f"{v.describe(g)}: {problem}" for g in bad]
        p.unsafe.update(bad)
        try:
            removed = decide()
        except GraphpruneError as e:  # the budget, counted with those groups whole, is out of reach
            raise type(e)(f"{e}. The self-check kept these groups whole (their rewrite did not reproduce the "
                          f"original): {'; '.join(blocked)}") from None
        out = p.prune(removed, fit=False)
    raise GraphpruneError(
        f"the pruned model does not reproduce its dead twin ({problem}), and keeping the groups responsible did not "
        f"repair it. No model was returned. Kept so far: {'; '.join(blocked) or 'nothing'}. Pass verify=False to get the "
        "unchecked model at your own risk, or ignore=[...] the modules named above, and please report the model.")
