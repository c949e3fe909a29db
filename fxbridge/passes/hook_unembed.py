"""Hook the unembedding output (``hook_unembed``, pre-softcap logits).

    logits = linear(x, W_U)            ->   logits = hook_unembed(linear(x, W_U))
"""
from .base import PassContext, graph_pass
from .graph_utils import hook_after, output_of


@graph_pass(expects=lambda spec, dims: 1)
def hook_unembed(ctx: PassContext) -> int:
    """Hook the output of the lm_head module."""
    out = output_of(ctx.graph, ctx.spec.unembed, "the unembedding's output (the logits)")
    hook_after(ctx.graph, ctx.root, out, "hook_unembed", shape=("B", "S", "V"), made_by="hook_unembed", scope="",
               hf_module=ctx.spec.unembed)
    ctx.aliases["unembed.hook_out"] = "hook_unembed"
    return 1
