"""dce: drop nodes whose results nothing uses (lossless)."""
from torch.fx import GraphModule

from graphprune.pass_manager import PassResult, register_pass


@register_pass("dce")
def dce(gm: GraphModule) -> PassResult:
    modified = gm.graph.eliminate_dead_code()
    if modified:
        gm.recompile()
    return PassResult(gm, modified)
