"""Hook the unembedding output (``hook_unembed``, pre-softcap logits).

    logits = linear(x, W_U)            ->   logits = hook_unembed(linear(x, W_U))
"""
from ..runtime.names import hook_name
from .base import PassContext, graph_pass
from .graph_utils import hook_after, output_of


@graph_pass(expects=lambda spec, dims: 1)
def hook_unembed(ctx: PassContext) -> int:
    """Hook the output of the lm_head module."""
    out = output_of(ctx.graph, ctx.spec.unembed, "the unembedding's output (the logits)")
    hook_after(ctx, out, hook_name("hook_unembed"), scope="", hf_module=ctx.spec.unembed)
    return 1
