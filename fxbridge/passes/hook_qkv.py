"""Hook the query/key/value projection outputs per head (``hook_q`` [B,S,H,dh], ``hook_k``/``hook_v`` [B,S,Hkv,dh]).

Separate projections:
    q = linear(x, W_Q)      ->   q = flatten(hook_q(unflatten(q)))      (same for k and v)
A view: nothing is copied, and the projection weights stay HF's. Specs with a fused projection (GPT-2's
``c_attn``) run ``split_fused_qkv`` instead.
"""
from ..runtime.names import hook_name
from .base import PassContext, graph_pass
from .graph_utils import heads_view, hook_viewed, output_of

_QKV = (("q", "attn.hook_q", "n_heads"), ("k", "attn.hook_k", "n_kv_heads"), ("v", "attn.hook_v", "n_kv_heads"))


@graph_pass(expects=lambda spec, dims: 3 * dims["n_layers"])
def hook_qkv(ctx: PassContext) -> int:
    """Hook the separate q/k/v projection outputs, viewed per head."""
    spec = ctx.spec
    found = 0
    for layer in range(ctx.dims["n_layers"]):
        attn_path = spec.layer(layer, spec.attn)
        sources = [spec.layer(layer, f"{spec.attn}.{getattr(spec, which)}") for which, *_ in _QKV]
        nodes = [output_of(ctx.graph, path, "the projection's output") for path in sources]
        for node, source, (_, hook, heads_key) in zip(nodes, sources, _QKV):
            to_hook, from_hook = heads_view(ctx.dims[heads_key], ctx.dims["d_head"])
            hook_viewed(ctx, node, hook_name(hook, layer), to_hook=to_hook, from_hook=from_hook, scope=attn_path,
                        hf_module=source)
            found += 1
    return found
