"""Tensor contractions, however the code spells them, as one explicit einsum equation.

``rules.einsum``, ``zeros.einsum`` and the FLOPs plan read an equation with a letter
for every dim and an explicit output. Code writes the same products other ways:
``einsum("...d,de->...e")`` (an ellipsis, or no ``->``), ``tensordot``, ``inner``,
``linalg.vecdot``, ``dot``, ``outer``. Each is written here as that equation from
its operands' ranks, so they couple, prune and count as einsum does; the call in the
graph is left as the code wrote it (a pruned dim shrinks in every operand alike).
A form this does not cover returns None and the op keeps its channels.
"""
from __future__ import annotations

import string


def explicit(equation: str, ranks: list[int]) -> str | None:
    """``equation`` with every ellipsis spelled out in letters of its own (right-aligned
    across operands, as einsum broadcasts them) and its output written: einsum's implicit
    output is the ellipsis, then the letters used once, in order. None where the
    equation does not fit the ranks."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    specs = lhs.split(",")
    if len(specs) != len(ranks) or any(s.count("...") > 1 or s.replace("...", "").count(".") for s in specs + [rhs]):
        return None
    named = [s.replace("...", "") for s in specs]
    if any(not c.isalpha() for s in named + [rhs.replace("...", "")] for c in s):
        return None
    spans = [r - len(n) if "..." in s else 0 for s, n, r in zip(specs, named, ranks)]
    if any(n < 0 for n in spans) or any("..." not in s and len(s) != r for s, r in zip(specs, ranks)):
        return None
    fresh = [c for c in string.ascii_letters if c not in eq][:max(spans, default=0)]
    if len(fresh) < max(spans, default=0):
        return None
    ellipsis = "".join(fresh)  # the widest ellipsis; a narrower one is its tail

    def spelled(s: str, span: int) -> str:
        return s.replace("...", ellipsis[len(ellipsis) - span:]) if span else s.replace("...", "")

    letters = "".join(named)
    if not arrow:
        rhs = ellipsis + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    elif "..." in rhs:
        rhs = rhs.replace("...", ellipsis)
    elif any(spans):  # an ellipsis summed out: einsum takes that only where the output names it
        return None
    return ",".join(spelled(s, n) for s, n in zip(specs, spans)) + "->" + rhs


def tensordot(rank_a: int, rank_b: int, dims) -> str | None:
    """``tensordot(a, b, dims)``: an int n contracts a's last n dims with b's first n; a pair of
    lists contracts them in pairs. The output is a's free dims, then b's."""
    if isinstance(dims, int) and not isinstance(dims, bool):
        if not 0 <= dims <= min(rank_a, rank_b):
            return None
        pairs = list(zip(range(rank_a - dims, rank_a), range(dims)))
    elif isinstance(dims, (list, tuple)) and len(dims) == 2:
        da, db = ([d] if isinstance(d, int) else list(d) for d in dims)
        if len(da) != len(db) or not all(isinstance(d, int) for d in da + db):
            return None
        try:
            pairs = [(range(rank_a)[i], range(rank_b)[j]) for i, j in zip(da, db)]
        except IndexError:
            return None
    else:
        return None
    letters = iter(string.ascii_letters)
    a = [next(letters) for _ in range(rank_a)]
    b = [next(letters) for _ in range(rank_b)]
    for i, j in pairs:
        b[j] = a[i]
    out = [c for i, c in enumerate(a) if i not in {i for i, _ in pairs}] + \
          [c for j, c in enumerate(b) if j not in {j for _, j in pairs}]
    return f"{''.join(a)},{''.join(b)}->{''.join(out)}"


def inner(rank_a: int, rank_b: int) -> str | None:
    """``inner(a, b)``: the last dims contracted, the output a's other dims then b's (a scalar
    operand is a product, not a contraction: None)."""
    return tensordot(rank_a, rank_b, ([-1], [-1])) if rank_a and rank_b else None


def vecdot(rank_x: int, rank_y: int, dim: int) -> str | None:
    """``linalg.vecdot(x, y, dim)``: x and y broadcast together, then summed along ``dim`` of the
    broadcast shape (real tensors: the conjugate of x is x)."""
    rank = max(rank_x, rank_y)
    if not rank or not -rank <= dim < rank:
        return None
    letters = string.ascii_letters[:rank]
    d = letters[dim % rank]
    return f"{letters[rank - rank_x:]},{letters[rank - rank_y:]}->{letters.replace(d, '')}"


def dot(rank_a: int, rank_b: int) -> str | None:
    """``dot(a, b)``: two vectors to a scalar."""
    return "a,a->" if rank_a == rank_b == 1 else None


def outer(rank_a: int, rank_b: int) -> str | None:
    """``outer(a, b)`` (also ``ger``): two vectors to their (n, m) product."""
    return "a,b->ab" if rank_a == rank_b == 1 else None
