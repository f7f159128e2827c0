"""dce: drop nodes whose results nothing uses (lossless).

A node whose result is unused but that writes into an operand
(``h.relu_()``, ``nn.ReLU(inplace=True)(h)`` as a statement) is not dead:
``graphprune.effects`` says which, and those stay.
"""
from torch.fx import GraphModule

from graphprune.effects import has_effect
from graphprune.pass_manager import PassResult, register_pass


@register_pass("dce")
def dce(gm: GraphModule) -> PassResult:
    modified = gm.graph.eliminate_dead_code(is_impure_node=has_effect)
    if modified:
        gm.recompile()
    return PassResult(gm, modified)
