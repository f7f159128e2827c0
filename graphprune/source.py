"""What a model's own code asks, read from its source with ``ast``.

A trace follows one path through ``forward``. The questions that send the code down
another are often plain to read: a setting it compares (``mode == 2``), a batch size it
tests (``x.shape[0] > 4``), whether a value is a tensor at all. The checks try the paths
those questions open (``module_form.beyond``, ``verify.check_trace``), and a question no
proxy answers truthfully sends the model to the tracer that can (``trace``).

Only code the trace runs is read: ``forward`` and what it calls by name, a method
(``self._mix(h)``, ``super().forward(x)``), a function of its module (``helper(h)``) or of
a module it imported (``utils.helper(h)``), a few calls deep; never torch's own.
"""
from __future__ import annotations

import ast
import builtins
import functools
import inspect
import linecache
import sys
import textwrap
import types

import torch

DEPTH = 3  # calls followed from forward
MAX_BATCHES = 4  # batch sizes tried from the code's own size tests, nearest the example's first
BATCH_LIMIT = 64  # a size test further out is not tried: the check would run that batch


def reached(cls: type) -> tuple:
    """(function, its ast) for ``cls.forward`` and what it calls, ``DEPTH`` calls deep."""
    forward = getattr(cls, "forward", None)
    return _reached(cls) if isinstance(forward, types.FunctionType) else ()


@functools.lru_cache(maxsize=None)
def _reached(cls: type, start=None) -> tuple:
    out, queue, seen = [], [(start or cls.forward, DEPTH)], set()
    while queue:
        fn, depth = queue.pop(0)
        fn = inspect.unwrap(fn)  # a decorated forward (@torch.no_grad()): the user's function, with its globals
        if fn in seen or depth == 0 or (fn.__module__ or "").split(".")[0] == "torch":
            continue
        seen.add(fn)
        tree = _parsed(fn)
        if tree is None:
            continue
        out.append((fn, tree))
        for node in ast.walk(tree):
            callee = _callee(node.func, fn, cls) if isinstance(node, ast.Call) else None
            if isinstance(callee, (staticmethod, classmethod)):
                callee = callee.__func__
            if isinstance(callee, types.FunctionType):
                queue.append((callee, depth - 1))
    return tuple(out)


# methods that run when a module is built or shown, not when it computes: what only they read is bookkeeping
_BUILD_OR_SHOW = frozenset({"__init__", "__repr__", "__str__", "extra_repr", "__getstate__", "__setstate__", "__del__",
                            "_init_weights", "reset_parameters"})


def held_forward(mod: torch.nn.Module):
    """The function of a forward ``mod`` holds on itself (``self.forward = self.forward_split_cat``, FasterNet),
    or None where it runs its class's."""
    own = vars(mod).get("forward")
    func = getattr(own, "__func__", own)
    return func if isinstance(func, types.FunctionType) else None


def model_reads(model: torch.nn.Module, library) -> frozenset | None:
    """The attribute names the user's code of ``model`` reads once it is built (``x._scale``, and a name given
    as a string, ``getattr(self, "_scale")`` or ``opts["_gain"]``): anywhere in the files its classes are
    written in (a parent reading ``self.gate._g``, a helper function of the file), and in the functions its
    forwards reach in other files, but not what only building or showing it reads (``__init__``,
    ``__repr__``; a function or lambda ``__init__`` defines is read later, and counts); a name-mangled
    ``self.__x`` as ``_Cls__x``. Classes for which ``library(cls)`` holds are not read. None where a class of
    the user's has no source to read."""
    names: set = set()
    classes = {c for m in model.modules() for c in type(m).__mro__ if c is not object and not library(c)}
    for c in classes:
        found = class_file_reads(c)
        if found is None:
            return None
        names |= found
        for fn, tree in reached(c):
            names |= _reads_in(tree, "")
    for m in model.modules():  # a method of its class held as its forward (FasterNet), or a function
        held = held_forward(m)
        if held is not None and not library(type(m)):
            for fn, tree in _reached(type(m), held):
                names |= _reads_in(tree, "")
    return frozenset(names)


def class_file_reads(cls: type) -> frozenset | None:
    """The names the code of the file ``cls`` is written in reads (``model_reads``); None without source."""
    try:
        file = inspect.getsourcefile(cls) or inspect.getfile(cls)
        getsource(cls)  # its lines are in linecache, and the class is found in them
    except (OSError, TypeError):
        return None
    return _reads_of_file(file, id(linecache.getlines(file)))


@functools.lru_cache(maxsize=256)
def _reads_of_file(file: str, _version: int) -> frozenset:
    """The names read in ``file`` (``model_reads``), once per contents of the file (``_version``)."""
    try:
        tree = ast.parse("".join(linecache.getlines(file)))
    except SyntaxError:
        return frozenset()
    out: set = set()

    def visit(node, owner: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, child.name)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and child.name in _BUILD_OR_SHOW:
                for inner in ast.walk(child):
                    if inner is not child and isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                        out.update(_reads_in(inner, owner))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                out.update(_reads_in(child, owner))
            else:
                visit(child, owner)

    visit(tree, "")
    return frozenset(out)


def _reads_in(node, owner: str) -> set:
    """The attribute names ``node`` loads, and the strings it holds that could name one; ``__x`` also as
    ``_Owner__x`` (Python's mangling in class ``owner``)."""
    mangled = f"_{owner.lstrip('_')}"
    out: set = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load):
            out.add(n.attr)
            if owner and n.attr.startswith("__") and not n.attr.endswith("__"):
                out.add(mangled + n.attr)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.isidentifier():
            out.add(n.value)
    return out


def runtime_assigned(model: torch.nn.Module, library) -> tuple[frozenset, frozenset] | None:
    """What the forwards of ``model`` (and what they call) assign as they run, in a branch too: ({(module path,
    name)} of attributes of its modules, ``self.x = ...`` in the module's own code, a parent's ``self.attn.seq_len
    = T``, ``setattr(self, "n", ...)``, ``self.__dict__["n"] = ...``; {names} assigned on other objects, a class's
    ``type(self).calls += 1`` among them). A fresh original lacks the first until it runs, which says nothing of
    how it was built; a class attribute of the second is a counter, not a setting. Not a default filled in
    where none was (``if not hasattr(self, "t"): self.t = 1.0``, ``self.t = getattr(self, "t", 1.0)``, in an
    ``except``): a value set before that is a setting. Classes (and functions) for which ``library`` holds are
    not read; None where a class of the user's has no source to read."""
    mine: set = set()
    other: set = set()
    for path, m in model.named_modules():
        cls = type(m)
        if library(cls):
            continue
        forward = held_forward(m) or getattr(cls, "forward", None)
        if not isinstance(forward, types.FunctionType) or library(forward):
            continue  # a module without a forward of its own (a holder of a setting, ``nn.Module``'s)
        found = _reached(cls, forward)
        if not found:
            return None
        for fn, tree in found:
            me = tuple(inspect.signature(fn).parameters)[:1]
            for chain, name in _assigned_in(tree, me):
                if chain is None or chain[:1] == ("__class__",):
                    other.add(name)
                else:
                    mine.add((".".join(x for x in (path, *chain) if x), name))
    return frozenset(mine), frozenset(other)


@functools.lru_cache(maxsize=1024)
def _assigned_in(tree: ast.AST, me: tuple) -> frozenset:
    """{(attribute chain from ``me`` or None for another object, name)} of what ``tree`` assigns unguarded."""
    out: set = set()

    def names(node) -> frozenset:
        return frozenset(n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)) | frozenset(
            n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str))

    def chain(node):
        """The attribute chain from ``me`` to ``node`` (``self.attn`` -> ("attn",)), or None."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        return tuple(reversed(parts)) if isinstance(node, ast.Name) and node.id in me else None

    def store(target, name, guarded) -> None:
        if isinstance(name, str) and name not in guarded:
            out.add((chain(target), name))

    def visit(node, guarded: frozenset) -> None:
        if isinstance(node, ast.If):
            visit(node.test, guarded)
            for child in [*node.body, *node.orelse]:
                visit(child, guarded | names(node.test))
            return
        if isinstance(node, ast.Try):  # ``try: self.t except AttributeError: self.t = 1.0``
            for child in [*node.body, *node.orelse, *node.finalbody]:
                visit(child, guarded)
            for handler in node.handlers:
                for child in handler.body:
                    visit(child, guarded | names(ast.Module(body=node.body, type_ignores=[])))
            return
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            # a value that reads the name it assigns fills in a default (``getattr(self, "t", 1.0)``)
            inner = guarded | names(node.value)
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                visit(t, inner)
            visit(node.value, guarded)
            return
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            store(node.value, node.attr, guarded)
        elif (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Attribute)
              and node.value.attr == "__dict__" and isinstance(node.slice, ast.Constant)):
            store(node.value.value, node.slice.value, guarded)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
              and len(node.args) == 3 and isinstance(node.args[1], ast.Constant)):
            store(node.args[0], node.args[1].value, guarded)
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, frozenset())
    return frozenset(out)


SHAPE_CALLS = frozenset({"view", "reshape", "expand", "repeat", "repeat_interleave", "split", "chunk", "unflatten",
                         "narrow", "tensor_split", "new_zeros", "new_ones", "new_empty", "new_full", "zeros", "ones",
                         "empty", "full", "rand", "randn"})
"""Calls whose arguments are sizes: a value an attribute gives them becomes a shape literal in the graph."""


def shape_reads(cls: type) -> frozenset:
    """The attributes of ``self`` that ``forward`` (and what it calls, ``reached``) gives to the size
    arguments of a shape call (``SHAPE_CALLS``) itself: ``view(B, T, self.n_head, -1)``,
    ``repeat_interleave(self.nh // self.nkv, 1)``. An attribute read only in a comparison, a slice or a
    modulo (``dist >= self.window``) is not one, whatever its value; nor one that reaches a shape through a
    local name (``T = self.max_len`` in a branch, then ``view(B, T, ...)``, where T is the input's length
    on the traced path)."""
    return _shape_reads(cls) if isinstance(getattr(cls, "forward", None), types.FunctionType) else frozenset()


def state_attributes(cls: type) -> frozenset | None:
    """The attributes of ``self`` that ``forward`` (and what it calls) keeps as state: added to anywhere
    (``self.updates += 1``, under ``if self.training`` too), or assigned on every call (``self.last = x``),
    or what they hold (``self.stats["n"] += 1``, ``self.feats.append(h)``); None where no source is there
    to read. One assigned only in a branch (``if self.scale is None: self.scale = 1.0``) is a setting the
    first call may fill in, not state (survey 58 F2)."""
    if not isinstance(getattr(cls, "forward", None), types.FunctionType):
        return None
    return _state_attributes(cls)


@functools.lru_cache(maxsize=None)
def _state_attributes(cls: type) -> frozenset | None:
    found = _reached(cls)
    if not found:
        return None
    out: set = set()
    for fn, tree in found:
        me = list(inspect.signature(fn).parameters)[:1]
        root = functools.partial(_root_attribute, me=me)
        out |= {root(n.target) for n in ast.walk(tree) if isinstance(n, ast.AugAssign)}
        # a container changed in place (``self.feats.append(h)``, ``self.seen.update(ids)``) keeps state too
        out |= {root(n.func.value) for n in ast.walk(tree) if isinstance(n, ast.Call)
                and isinstance(n.func, ast.Attribute) and n.func.attr in _IN_PLACE}
        body = [f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))][:1]
        todo = list(body[0].body) if body else []
        while todo:  # statements every call runs: the body, and what a ``with`` holds
            st = todo.pop()
            if isinstance(st, ast.With):
                todo += st.body
            targets = st.targets if isinstance(st, ast.Assign) else [st.target] if isinstance(st, ast.AnnAssign) else []
            asked = _asked_for(st.value) if targets and st.value is not None else frozenset()
            # ``self.t = getattr(self, "t", 1.0)`` fills in a default where none was set: a setting (survey 70 F2)
            out |= {root(t) for t in targets} - asked
    return frozenset(out - {None})


def _asked_for(value: ast.AST) -> frozenset:
    """The names ``value`` asks whether an object has (``hasattr(self, "t")``, ``getattr(self, "t", 1.0)``)."""
    return frozenset(n.args[1].value for n in ast.walk(value)
                     if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("hasattr", "getattr")
                     and len(n.args) >= 2 and isinstance(n.args[1], ast.Constant) and isinstance(n.args[1].value, str)
                     and (n.func.id == "hasattr" or len(n.args) == 3))


# methods that change a list, dict, set or deque in place
_IN_PLACE = frozenset({"append", "appendleft", "extend", "extendleft", "insert", "pop", "popleft", "popitem", "remove",
                       "clear", "update", "setdefault", "add", "discard", "__setitem__", "__delitem__"})


def _root_attribute(t: ast.AST, me: list) -> str | None:
    """The attribute of ``self`` that an assignment target or a value starts at: ``x`` for ``self.x``,
    ``self.x.steps`` and ``self.x["n"][0]``; None for anything else."""
    while isinstance(t, (ast.Attribute, ast.Subscript)):
        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in me:
            return t.attr
        t = t.value
    return None


class _ShapeReads(ast.NodeVisitor):
    """The attributes of ``self`` (``me``: what the method calls it) that shape calls read."""

    def __init__(self, me: list):
        self.me, self.out = me, set()

    def visit_Call(self, node):
        self.generic_visit(node)
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        if name in SHAPE_CALLS:
            self.out |= {n.attr for a in [*node.args, *(k.value for k in node.keywords)] for n in ast.walk(a)
                         if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in self.me}


def module_shape_reads(mod: torch.nn.Module) -> frozenset:
    """``shape_reads`` of the forward ``mod`` runs: its class's, or a method of its class it holds as its
    ``forward`` (FasterNet's ``self.forward = self.forward_split_cat``)."""
    if "forward" not in vars(mod):
        return shape_reads(type(mod))
    own, func = vars(mod)["forward"], held_forward(mod)
    return _shape_reads(type(mod), func) if func is not None and getattr(own, "__self__", None) is mod else frozenset()


@functools.lru_cache(maxsize=None)
def _shape_reads(cls: type, start=None) -> frozenset:
    out = set()
    for fn, tree in _reached(cls, start):
        visitor = _ShapeReads(list(inspect.signature(fn).parameters)[:1])  # what the method calls its module: self, or s
        visitor.visit(tree)
        out |= visitor.out
    return frozenset(out)


def _callee(f: ast.AST, fn, cls: type):
    """What a call in ``fn`` (a function of ``cls``) names: ``self.method``, ``super().method``, a
    function of its module (``helper``), or of a module it imported (``utils.helper``), or a method
    of a class it names (``Base.forward``)."""
    if isinstance(f, ast.Name):
        return fn.__globals__.get(f.id)
    if not isinstance(f, ast.Attribute):
        return None
    owner = f.value
    if isinstance(owner, ast.Name) and owner.id == "self":
        return inspect.getattr_static(cls, f.attr, None)
    if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
        mro = cls.__mro__  # after the class that defines fn: a parent's own super() goes on to the grandparent
        at = next((i for i, k in enumerate(mro) if any(_is(v, fn) for v in vars(k).values())), 0)
        return next((vars(k)[f.attr] for k in mro[at + 1:] if f.attr in vars(k)), None)
    if isinstance(owner, ast.Name) and isinstance(fn.__globals__.get(owner.id), types.ModuleType):
        return getattr(fn.__globals__[owner.id], f.attr, None)
    if isinstance(owner, ast.Name) and isinstance(fn.__globals__.get(owner.id), type):
        # Base.forward(self, h): a parent's method called by name, not through super() (survey 31 f10)
        return inspect.getattr_static(fn.__globals__[owner.id], f.attr, None)
    return None


def _is(value, fn) -> bool:
    value = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
    return callable(value) and inspect.unwrap(value) is fn


def _parsed(fn) -> ast.AST | None:
    try:
        return ast.parse(textwrap.dedent(getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None


def getsource(obj) -> str:
    """``inspect.getsource``, a class found in its file parsed once per contents of the file.
    Before Python 3.13, ``inspect`` finds a class by parsing its whole file on every call, 40 ms
    for a file of a thousand lines; the checks read each class a model is made of (a test file's
    classes, a transformers modeling file), and the parsing was a tenth of a small model's compile.
    Raises as ``inspect.getsource`` does (OSError, TypeError) where there is no source."""
    if not isinstance(obj, type):
        return inspect.getsource(obj)
    file = inspect.getsourcefile(obj) or inspect.getfile(obj)
    module = sys.modules.get(obj.__module__)
    linecache.checkcache(file)  # a file edited since it was read is read again
    lines = linecache.getlines(file, module.__dict__ if module else None)
    if not lines:
        raise OSError(f"could not get source code of {obj.__qualname__}")
    held = _CLASSES.get(file)
    if held is None or held[0] is not lines:  # linecache holds one list per contents of the file
        held = _CLASSES[file] = (lines, _class_defs(ast.parse("".join(lines))))
    node = held[1].get(obj.__qualname__)
    if node is None:
        raise OSError(f"could not find class definition of {obj.__qualname__}")
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return "".join(lines[start - 1:node.end_lineno])


_CLASSES: dict = {}  # {file: (its lines as linecache holds them, {qualname: first ClassDef of that name})}


def _class_defs(tree: ast.AST) -> dict:
    """{qualified name: ClassDef}, in source order, the first of a name kept (what ``inspect`` finds):
    ``A.B`` for a class in a class, ``f.<locals>.C`` for one defined in a function."""
    out: dict = {}

    def visit(node, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                out.setdefault(prefix + child.name, child)
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{prefix}{child.name}.<locals>.")
            else:  # if / try / with blocks: the same scope
                visit(child, prefix)

    visit(tree, "")
    return out


def asks_tensor_type(cls: type) -> bool:
    """Whether code the forward runs asks whether a value is a tensor: ``isinstance(v, T)`` for
    a tensor class ``T`` however it is named (``torch.Tensor``, ``Tensor`` imported under another
    name, ``torch.FloatTensor``, ``nn.Parameter``), or ``torch.is_tensor`` however it is named. A proxy is no tensor to it (torch.export's
    fake tensors are). ``type(v) is torch.Tensor`` is False under either tracer: ``batch_sizes``
    and the checks it feeds catch where that matters."""
    for fn, tree in reached(cls):
        scope = {**vars(builtins), **fn.__globals__}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            if isinstance(node.func, ast.Name) and node.func.id == "isinstance" and len(node.args) == 2 \
                    and _tensor_type(node.args[1], scope):
                return True
            if any(_named(node.func, scope) is f for f in TENSOR_TESTS):  # `from torch import is_tensor` too:
                return True  # the tracer's patch of torch.is_tensor misses a name bound before it (survey 31 f18)
    return False


TENSOR_TESTS = (torch.is_tensor, torch.overrides.is_tensor_like)


def _named(node, scope: dict):
    """What ``node``, a name, a dotted path or a tuple of them, names in ``scope``, or None where it
    is none of those or names nothing there (a local). Evaluating such a path calls nothing."""
    if not all(isinstance(n, (ast.Name, ast.Attribute, ast.Tuple, ast.Load)) for n in ast.walk(node)):
        return None
    try:
        return eval(compile(ast.Expression(node), "<type>", "eval"), scope)  # noqa: S307
    except Exception:  # noqa: BLE001 - a local name: left alone
        return None


def _tensor_type(node, scope: dict) -> bool:
    """Whether ``node``, a name, a dotted path or a tuple of them, names a tensor class."""
    value = _named(node, scope)
    return any(isinstance(v, type) and issubclass(v, torch.Tensor) for v in (value if isinstance(value, tuple) else (value,)))


LAYOUT_ATTRS = frozenset({"requires_grad", "is_contiguous", "stride", "is_leaf", "grad_fn"})


def reads_layout(model: torch.nn.Module) -> bool:
    """Whether code the forward runs asks how an input is held rather than what it holds
    (``x.requires_grad``, ``x.is_contiguous()``, its strides): the trace saw the example's answer."""
    return any(_reads_layout(type(m)) for m in model.modules())


@functools.lru_cache(maxsize=None)
def _reads_layout(cls: type) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr in LAYOUT_ATTRS for _, tree in reached(cls) for n in ast.walk(tree))


PACKING = {"pack_padded_sequence", "pack_sequence", "PackedSequence"}  # torch.nn.utils.rnn's packed batches


def packs_sequences(model: torch.nn.Module) -> str | None:
    """The class whose forward (or what it calls) packs sequences for an RNN, or None. A packed batch carries
    its lengths as data: neither tracer follows it, and their errors named FakeTensors and
    ``__cuda_array_interface__`` rather than the packing (survey 36 F12)."""
    return next((type(m).__name__ for m in model.modules() if _packs(type(m))), None)


@functools.lru_cache(maxsize=None)
def _packs(cls: type) -> bool:
    return any(isinstance(n, (ast.Name, ast.Attribute)) and (n.id if isinstance(n, ast.Name) else n.attr) in PACKING
               for _, tree in reached(cls) for n in ast.walk(tree))


def batch_sizes(model: torch.nn.Module, batch: int) -> list[int]:
    """Batch sizes either side of each size test the forward makes on a batch
    (``x.shape[0] > 4``, ``x.size(0) >= 8``, ``len(x) == 3``, ``b`` from ``b, c = x.shape[:2]``),
    on the far side from ``batch``, the example's: ``MAX_BATCHES`` of them nearest it, up to ``BATCH_LIMIT``.

    Where the code asks something a tracer answers wrongly before such a test (``type(h) is
    torch.Tensor``, ``hasattr(h, ...)``, an ``except`` around it, ``is_fx_tracing()``), the
    trace never meets the test, sets no bound on the batch, and matched the model at the
    example; from batch 5 both the graph and the module form were 0.11 off (survey 20)."""
    found: set = set()
    for cls in {type(m) for m in model.modules()}:
        found.update(_size_tests(cls))
    # the far side of each test from the example's batch: c and one past it (`> c`, `>= c`, `== c`)
    far = {n for c in found for n in ((c, c + 1) if batch < c else (c, c - 1) if batch > c else (c - 1, c + 1))}
    return sorted((n for n in far if 1 <= n <= BATCH_LIMIT and n != batch), key=lambda n: (abs(n - batch), n))[:MAX_BATCHES]


def _size_tests(cls: type) -> frozenset:
    return _compared_sizes(cls)[0]


def other_size_constants(model: torch.nn.Module) -> list[int]:
    """The integers code of the model compares a size other than the batch with (``h.shape[-1] > 8``,
    ``t == 1`` after ``t = x.size(1)``, ``h.shape[-2:] == (7, 7)``, ``w <= self.window`` read off each
    module), not ranks (``x.dim() == 4``), sorted: ``module_form.beyond`` moves input sizes to the far
    side of each."""
    found: set = set()
    for m in model.modules():
        if isinstance(getattr(type(m), "forward", None), types.FunctionType):
            _, numbers, attrs = _compared_sizes(type(m))
            found.update(numbers)
            for name in attrs:  # a threshold the module holds: `if h.shape[-1] > self.window`
                found.update(_ints(getattr(m, name, None)))
    return sorted(found)


def _ints(value) -> list[int]:
    """``value`` if it is an int, the ints of a tuple or list of them, else []."""
    values = value if isinstance(value, (tuple, list)) else [value]
    return [v for v in values if type(v) is int]


@functools.lru_cache(maxsize=None)
def _compared_sizes(cls: type) -> tuple[frozenset, frozenset, frozenset]:
    """(the integers compared with a batch size, those compared with another size, the names of
    ``self`` attributes compared with another size) in code ``cls``'s forward runs."""
    batch, other, attrs = set(), set(), set()
    for _fn, tree in reached(cls):
        batch_names, other_names = _size_names(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            numbers = [v for s in sides for v in _int_constants(s)]
            if any(_is_batch(s, batch_names) for s in sides):
                batch.update(v for s in sides if isinstance(s, ast.Constant) for v in _int_constants(s))
            sized = [s for s in sides if _sized(s, other_names) and not _is_batch(s, set())]
            if sized and not all(_is_rank(s) for s in sized):
                other.update(numbers)
                attrs.update(s.attr for s in sides if isinstance(s, ast.Attribute)
                             and isinstance(s.value, ast.Name) and s.value.id == "self")
    return frozenset(batch), frozenset(other), frozenset(attrs)


def _size_names(tree: ast.AST) -> tuple[set, set]:
    """The names ``tree`` binds to sizes: (the batch's: ``b = x.shape[0]``, ``b`` of ``b, c, h, w = x.shape``;
    the others': ``c, h, w`` there, ``t = x.size(1)``)."""
    batch, other = set(), set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target = node.targets[0]
        if isinstance(target, ast.Tuple) and target.elts and _is_shape(node.value):
            if isinstance(target.elts[0], ast.Name):
                batch.add(target.elts[0].id)
            other.update(e.id for e in target.elts[1:] if isinstance(e, ast.Name))
        elif isinstance(target, ast.Name):
            if _is_batch(node.value, batch):
                batch.add(target.id)
            elif _sized(node.value, other):
                other.add(target.id)
    return batch, other


def _int_constants(node) -> list[int]:
    """``8`` or the integers of ``(7, 7)``."""
    elts = node.elts if isinstance(node, (ast.Tuple, ast.List)) else [node]
    return [e.value for e in elts if isinstance(e, ast.Constant) and type(e.value) is int]


def _is_rank(node) -> bool:
    """``x.dim()`` or ``x.ndim``: a rank, not a size."""
    return (isinstance(node, ast.Attribute) and node.attr == "ndim") or (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "dim" and not node.args)


def _sized(node, names: set) -> bool:
    """Whether ``node`` reads a size: a ``.shape`` or ``.ndim``, a ``.size(...)`` or ``.dim()`` call, or a name bound to one."""
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and n.attr in ("shape", "ndim"):
            return True
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("size", "dim"):
            return True
        if isinstance(n, ast.Name) and n.id in names:
            return True
    return False


def _is_shape(node) -> bool:
    """``x.shape``, ``x.size()``, or a slice of either from its start."""
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Slice) and node.slice.lower is None:
        node = node.value
    return (isinstance(node, ast.Attribute) and node.attr == "shape") or (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "size" and not node.args)


def _is_batch(node, names: set) -> bool:
    """``x.shape[0]``, ``x.size(0)``, ``x.size()[0]``, ``len(x)``, or a name bound to one."""
    if isinstance(node, ast.Name):
        return node.id in names
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == 0:
        return _is_shape(node.value)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "size":
        return len(node.args) == 1 and isinstance(node.args[0], ast.Constant) and node.args[0].value == 0
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "len" and len(node.args) == 1


def tested_batches(model: torch.nn.Module, args: tuple, kwargs: dict, *, one: bool = False) -> list[tuple[int, tuple, dict]]:
    """(size, args, kwargs): the example at each of ``batch_sizes`` (and with ``one``, at a batch of 1),
    its batch ``batches.example_batch``; [] where it has none."""
    from .batches import example_batch

    batch = example_batch(args, kwargs, model)
    if batch is None:
        return []
    sizes = batch_sizes(model, batch)
    if one and batch > 1 and 1 not in sizes:  # torch.export takes a symbolic size for never 1 and guards no test
        sizes.append(1)  # of it: `x.numel() == 16` at batch 1 ran the other branch in the trace, 0.5 off (survey 30 f14)
    return [(n, *at_batch(args, kwargs, batch, n)) for n in sizes]


def at_batch(args: tuple, kwargs: dict, batch: int, size: int) -> tuple[tuple, dict]:
    """The example at another batch ``size``: every tensor with ``batch`` rows takes its rows in
    turn, each round scaled apart (a batch of copies is one BatchNorm normalises to zeros)."""
    from torch.utils._pytree import tree_map

    def resize(t):
        if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] != batch:
            return t
        idx = torch.arange(size, device=t.device)
        out = t.index_select(0, idx % batch)
        if out.is_floating_point():
            rounds = (idx // batch).to(out.dtype).view(-1, *[1] * (t.dim() - 1))
            out = out * (1 + 0.25 * rounds)
        return out

    return tree_map(resize, (tuple(args), dict(kwargs)))


def compared_constants(model: torch.nn.Module) -> dict:
    """{name: constants} that code of the model's own classes compares a plain name to, in any
    method or function forward calls (``if mode == 2``, ``mode in (1, 2)``, ``mode in MODES``,
    ``how.lower() == "fast"``, ``how.startswith("fa")``, ``{"a": f, "b": g}[how]``, ``case
    "fast":``): a keyword is often handed down to a block that branches on it under the same
    name. Under ``None``, every string compared to any name: handed down under another name
    (``kind == "centre"``), a string setting still meets it. Classes in a fixed order (by name),
    so the values tried are the same on every run."""
    found: dict = {}
    for cls in sorted({type(m) for m in model.modules()}, key=lambda c: (c.__module__, c.__qualname__)):
        for name, values in _compared_in(cls).items():
            found.setdefault(name, [])
            found[name] += [v for v in values if v not in found[name]]
    anywhere = [v for values in found.values() for v in values if isinstance(v, str)]
    found[None] = list(dict.fromkeys(anywhere))
    return found


@functools.lru_cache(maxsize=None)
def _compared_in(cls: type) -> dict:
    if cls.__module__.startswith("torch."):
        return {}
    own, module = _parsed(cls), inspect.getmodule(cls)  # a class made in a notebook cell has no source of its own
    trees = [(own, vars(module) if module else {})] if own is not None else []
    trees += [(tree, fn.__globals__) for fn, tree in reached(cls)
              if own is None or fn.__qualname__.split(".")[0] != cls.__qualname__]
    found: dict = {}
    for tree, scope in trees:
        for name, values in _compared_names(tree, scope).items():
            found.setdefault(name, []).extend(values)
    return {k: [v for v in vs if isinstance(v, (int, float, str)) and not isinstance(v, bool)] for k, vs in found.items()}


def _compared_names(tree: ast.AST, scope: dict) -> dict:
    def constants(node) -> list:
        if isinstance(node, ast.Constant):
            return [node.value]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [e.value for e in node.elts if isinstance(e, ast.Constant)]
        if isinstance(node, ast.Dict):
            return [k.value for k in node.keys if isinstance(k, ast.Constant)]
        if isinstance(node, ast.Name) and isinstance(scope.get(node.id), (tuple, list, set, frozenset, dict)):
            return [v for v in scope[node.id] if isinstance(v, (int, float, str))]  # a module's MODES = ("a", "b")
        return []

    def subject(node) -> str | None:  # how, or how.lower() / how.strip(): the name a comparison is about
        while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and not node.args:
            node = node.func.value
        return node.id if isinstance(node, ast.Name) else None

    found: dict = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            for i, side in enumerate(sides):
                name = subject(side)
                if name is not None:
                    for other in sides[:i] + sides[i + 1:]:
                        found.setdefault(name, []).extend(constants(other))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("startswith", "endswith") and subject(node.func.value) is not None:
            found.setdefault(subject(node.func.value), []).extend(c for a in node.args for c in constants(a))
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Dict) and subject(node.slice) is not None:
            found.setdefault(subject(node.slice), []).extend(constants(node.value))  # {"a": f, "b": g}[how]
        elif isinstance(node, ast.Match) and subject(node.subject) is not None:
            for case in node.cases:
                for p in ast.walk(case.pattern):
                    if isinstance(p, ast.MatchValue):
                        found.setdefault(subject(node.subject), []).extend(constants(p.value))
    return found
