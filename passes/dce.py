"""dce: drop nodes whose results nothing uses, and submodules the graph never runs (lossless).

A node whose result is unused but that writes into an operand
(``h.relu_()``, ``nn.ReLU(inplace=True)(h)`` as a statement) is not dead:
``graphprune.effects`` says which, and those stay. Submodules the graph never
calls or reads go first (``unrun_submodules``): the traced
GraphModule keeps the user's whole module tree, so without this it carried
weights its forward never runs (GoogLeNet's auxiliary heads in eval mode, half
its parameters) into every candidate, count and saved file. The modules of
nodes found dead here stay: the module form runs them, pruned with the rest.
"""
import torch
from torch.fx import GraphModule

from graphprune.effects import has_effect
from graphprune.pass_manager import PassResult, register_pass


@register_pass("dce")
def dce(gm: GraphModule) -> PassResult:
    unread = [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]
    for n in unread:
        gm.graph.erase_node(n)  # torch.export reads every parameter, used or not
    unrun = unrun_submodules(gm)  # before dead nodes go: their modules stay (the module form runs them, pruned)
    for name in unrun:
        gm.delete_submodule(name)
    modified = bool(unread or unrun)
    modified |= gm.graph.eliminate_dead_code(is_impure_node=has_effect)
    if modified:
        gm.recompile()
    return PassResult(gm, modified)


def unrun_submodules(gm: GraphModule) -> list[str]:
    """The outermost submodules the graph neither names (a ``call_module``, or a ``get_attr``
    something uses, at or under them) nor reads a tensor of by identity. fx's
    ``delete_all_unused_submodules`` goes by names alone, and a tied weight is read
    under one name only: torch.export reads GPT-2's ``transformer.wte.weight`` as
    ``lm_head.weight``, and deleting ``transformer.wte`` left the module form an
    unpruned embedding."""
    named, read = set(), set()
    for n in gm.graph.nodes:
        if n.op not in ("call_module", "get_attr") or (n.op == "get_attr" and not n.users):
            continue  # torch.export reads every parameter, used or not
        parts = n.target.split(".")
        named.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        owner = n.target if n.op == "call_module" else ".".join(parts[:-1])
        mod = gm.get_submodule(owner) if owner else gm
        if n.op == "call_module":
            named.update(f"{n.target}.{k}" for k, _ in mod.named_modules() if k)
            read.update(id(t) for t in [*mod.parameters(), *mod.buffers()])
        else:
            t = getattr(mod, parts[-1], None)
            if isinstance(t, torch.Tensor):
                read.add(id(t))
    unrun = [name for name, m in gm.named_modules() if name and name not in named
             and not any(id(t) in read for t in [*m.parameters(), *m.buffers()])]
    return [name for name in unrun if name.rpartition(".")[0] not in unrun]
