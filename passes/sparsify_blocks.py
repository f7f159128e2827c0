"""sparsify-blocks: run chosen Linear and 1x1 Conv2d layers as block-sparse layers.

Channel pruning stops where removing a whole channel costs too much accuracy.
Inside the layers that remain, zeroing whole (bn, bk) weight blocks still pays
off, because ``graphprune.kernels`` skips empty blocks on tensor cores. This
pass keeps, in each chosen layer, the ``density`` fraction of blocks with the
largest norms and swaps the module for a ``BlockSparseLinear`` (a 1x1 conv,
which is a Linear over channels, becomes a ``BlockSparseConv1x1``).

Options:
    density     fraction of blocks kept in each layer, in [0, 1] (default 0.25)
    block_size  16, 32, 64, 128, or a pair (bn, bk) of them (default 64)
    modules     fnmatch pattern, or list of patterns, over qualified module
                names (default: every Linear and every 1x1 stride-1 unpadded
                ungrouped Conv2d). In a pipeline string, separate the options
                with ';' when a list holds commas:
                ``sparsify-blocks{modules=['fc1','fc2'];density=0.5}``

The graph keeps its shape: each chosen ``call_module`` node keeps its target and
only the module behind it changes, so node metadata stays valid. Layers whose
shape the block size does not divide, and convs that are not 1x1 linears, are
left dense and listed with the reason in
``result.graph_module.meta["sparsify_blocks"]["skipped"]``; converted ones under
``["converted"]``. ``REWRITES`` counts conversions over the whole process.
"""
from __future__ import annotations

import copy
import fnmatch
from collections import Counter

from torch import nn
from torch.fx import GraphModule

from graphprune.errors import GraphpruneError
from graphprune.pass_manager import PassResult, register_pass

__all__ = ["sparsify_blocks", "REWRITES"]

#: Conversions made by this pass in this process: keys "linear", "conv1x1", "skipped".
REWRITES: Counter = Counter()


@register_pass("sparsify-blocks", computes_weights=True)
def sparsify_blocks(gm: GraphModule, density: float = 0.25, block_size=64, modules=None) -> PassResult:
    """Return a new GraphModule whose chosen layers are block-sparse (the input is not modified)."""
    # Imported here: the kernels need Triton, and loading the pass registry must not.
    from graphprune.kernels import BlockSparseConv1x1, BlockSparseLinear
    from graphprune.kernels.layout import as_block_size
    from graphprune.kernels.modules import conv1x1_problem

    if not isinstance(gm, GraphModule):
        raise GraphpruneError(f"sparsify-blocks takes a torch.fx.GraphModule, got {type(gm).__name__}; trace the model first")
    if not isinstance(density, (int, float)) or not 0.0 <= float(density) <= 1.0:
        raise GraphpruneError(f"sparsify-blocks: density must be a number in [0, 1], got {density!r}")
    bn, bk = as_block_size(block_size)
    patterns = [modules] if isinstance(modules, str) else modules
    if patterns is not None and not (isinstance(patterns, (list, tuple)) and all(isinstance(p, str) for p in patterns)):
        raise GraphpruneError(f"sparsify-blocks: modules must be a pattern or a list of patterns (strings), got {modules!r}")

    found = {}  # name -> module, in graph order
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in found:
            module = gm.get_submodule(node.target)
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                found[node.target] = module
    candidates = list(found.items())
    if patterns is not None:
        chosen = [(name, m) for name, m in candidates if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
        if not chosen:
            names = ", ".join(name for name, _ in candidates[:8]) or "none"
            raise GraphpruneError(
                f"sparsify-blocks: modules={patterns!r} matches no Linear or Conv2d called in the graph "
                f"(candidates: {names}{', ...' if len(candidates) > 8 else ''}); fix the patterns"
            )
    else:
        chosen = candidates

    result = copy.deepcopy(gm)
    converted: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name, module in chosen:
        if isinstance(module, nn.Linear):
            kind, problem = "linear", None if type(module).forward is nn.Linear.forward else f"{type(module).__name__} overrides Linear.forward"
            out_features, in_features = module.out_features, module.in_features
        else:
            kind, problem = "conv1x1", conv1x1_problem(module)
            out_features, in_features = module.out_channels, module.in_channels
        if problem is None and (out_features % bn or in_features % bk):
            problem = f"weight ({out_features}, {in_features}) is not divisible by the block size ({bn}, {bk})"
        if problem is None:
            problem = _held(gm, name, module)
        if problem is not None:
            skipped[name] = problem
            continue
        original = result.get_submodule(name)
        if kind == "linear":
            replacement = BlockSparseLinear.from_linear(original, (bn, bk), float(density))
        else:
            replacement = BlockSparseConv1x1.from_conv(original, (bn, bk), float(density))
        parent_name, _, attr = name.rpartition(".")
        setattr(result.get_submodule(parent_name) if parent_name else result, attr, replacement)
        converted[name] = kind

    REWRITES.update(converted.values())
    REWRITES["skipped"] += len(skipped)
    result.meta["sparsify_blocks"] = {"converted": converted, "skipped": skipped}
    result.recompile()
    return PassResult(result, bool(converted))


def _held(gm, name: str, module: nn.Module) -> str | None:
    """What keeps a layer as it is, beyond its own shape: hooks the replacement would not run
    (a forward hook scaling the output by 3 was dropped, and the result moved by 4.0), the graph
    reading its tensors directly (``x @ self.fc.weight.t()`` met a BlockSparseWeight), or a call
    with keyword arguments (``self.fc(input=h)``) its forward does not take (survey 27)."""
    from graphprune.canon import computes_unseen

    if computes_unseen(module):
        return "it has hooks or a computed weight, which the block-sparse module would not run"
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target.startswith(name + "."):
            return f"the graph reads its {n.target[len(name) + 1:]} directly"
        if n.op == "call_module" and n.target == name and n.kwargs:
            return f"it is called with keyword arguments ({', '.join(n.kwargs)})"
    return None
