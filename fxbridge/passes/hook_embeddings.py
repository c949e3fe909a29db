"""Hook the token embedding (``hook_embed``) and learned position embedding (``hook_pos_embed``) outputs.

    emb = embedding(W_E, ids)          ->   emb = embedding(W_E, ids); emb = hook_embed(emb)
"""
from .base import PassContext, graph_pass
from .graph_utils import hook_after, module_output


@graph_pass(expects=lambda spec, dims: 1 + (spec.pos_embed is not None))
def hook_embeddings(ctx: PassContext) -> int:
    """Hook the outputs of the token and position embedding modules."""
    found = 0
    for path, name in ((ctx.spec.embed, "hook_embed"), (ctx.spec.pos_embed, "hook_pos_embed")):
        if path is None:
            continue
        out = module_output(ctx.graph, path)
        if out is None:
            continue
        hook_after(ctx.graph, ctx.root, out, name, shape=("B", "S", "D"), made_by="hook_embeddings", scope="",
                   hf_module=path)
        found += 1
    return found
