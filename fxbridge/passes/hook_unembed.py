"""Hook the unembedding output (``hook_unembed``, pre-softcap logits).

    logits = linear(x, W_U)            ->   logits = hook_unembed(linear(x, W_U))
"""
from .base import PassContext, graph_pass
from ..tracer.graph_facts import ModuleRegion
from .graph_utils import hook_after


@graph_pass(expects=lambda spec, dims: 1)
def hook_unembed(ctx: PassContext) -> int:
    """Hook the output of the lm_head module."""
    out = ModuleRegion.of(ctx.graph, ctx.spec.unembed).output
    if out is None:
        return 0
    hook_after(ctx.graph, ctx.root, out, "hook_unembed", shape=("B", "S", "V"), made_by="hook_unembed", scope="",
               hf_module=ctx.spec.unembed)
    ctx.aliases["unembed.hook_out"] = "hook_unembed"
    return 1
