"""dce: drop nodes whose results nothing uses, and submodules the graph never runs (lossless).

A node whose result is unused but that writes into an operand
(``h.relu_()``, ``nn.ReLU(inplace=True)(h)`` as a statement) is not dead:
``graphprune.effects`` says which, and those stay. Submodules the graph never
calls or reads go first (fx's ``delete_all_unused_submodules``): the traced
GraphModule keeps the user's whole module tree, so without this it carried
weights its forward never runs (GoogLeNet's auxiliary heads in eval mode, half
its parameters) into every candidate, count and saved file. The modules of
nodes found dead here stay: the module form runs them, pruned with the rest.
"""
from torch.fx import GraphModule

from graphprune.effects import has_effect
from graphprune.pass_manager import PassResult, register_pass


@register_pass("dce")
def dce(gm: GraphModule) -> PassResult:
    before = len(list(gm.modules()))
    gm.delete_all_unused_submodules()  # first: the modules of dead nodes stay (the module form runs them, pruned)
    modified = len(list(gm.modules())) != before
    if gm.graph.eliminate_dead_code(is_impure_node=has_effect):
        gm.recompile()
        modified = True
    return PassResult(gm, modified)
