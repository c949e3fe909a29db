"""Hook the token embedding (``hook_embed``) and learned position embedding (``hook_pos_embed``) outputs.

    emb = embedding(W_E, ids)          ->   emb = hook_embed(embedding(W_E, ids))
    pos = embedding(W_pos, pos_ids)    ->   pos = hook_pos_embed(expand(pos, [B, S, D]))
HF computes position embeddings once, [1,S,D], and broadcasts; the hook sees them per batch row as
TransformerLens does (the expand is a view: nothing is copied).
"""
import torch

from ..runtime.names import hook_name
from .base import PassContext, graph_pass
from .graph_utils import hook_after, hook_viewed, output_of

aten = torch.ops.aten


def _batch_of(node):
    val = node.meta.get("val")
    return val.shape[0] if isinstance(val, torch.Tensor) else None


@graph_pass(expects=lambda spec, dims: 1 + (spec.pos_embed is not None))
def hook_embeddings(ctx: PassContext) -> int:
    """Hook the outputs of the token and position embedding modules."""
    spec, graph = ctx.spec, ctx.graph
    embed = output_of(graph, spec.embed, "the token embedding's output")
    found = 1
    if spec.pos_embed is not None:
        pos = output_of(graph, spec.pos_embed, "the position embedding's output")
        if _batch_of(pos) == 1 and _batch_of(embed) != 1:
            ids = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "input_ids")
            with graph.inserting_before(pos):
                batch = graph.call_function(aten.sym_size.int, (ids, 0))
            hook_viewed(ctx, pos, hook_name("hook_pos_embed"), to_hook=(aten.expand.default, ([batch, -1, -1],)),
                        from_hook=(aten.alias.default, ()), scope="", hf_module=spec.pos_embed)
        else:
            hook_after(ctx, pos, hook_name("hook_pos_embed"), scope="", hf_module=spec.pos_embed)
        found += 1
    hook_after(ctx, embed, hook_name("hook_embed"), scope="", hf_module=spec.embed)
    return found
