"""Hook the query/key/value projection outputs per head (``hook_q`` [B,S,H,dh], ``hook_k``/``hook_v`` [B,S,Hkv,dh]).

Separate projections:
    q = linear(x, W_Q)      ->   q = flatten(hook_q(unflatten(q)))      (same for k and v)
A view: nothing is copied, and the projection weights stay HF's. Specs with a fused projection (GPT-2's
``c_attn``) run ``split_fused_qkv`` instead.
"""
from .base import PassContext, graph_pass
from .graph_utils import heads_view, hook_viewed, output_of

_QKV = (("q", "hook_q", "n_heads", "H"), ("k", "hook_k", "n_kv_heads", "Hkv"), ("v", "hook_v", "n_kv_heads", "Hkv"))
_ALIASES = {"hook_q": "q.hook_out", "hook_k": "k.hook_out", "hook_v": "v.hook_out"}


def _hook_heads(ctx, node, layer, hook, heads_key, heads_sym, attn_path, hf_module):
    to_hook, from_hook = heads_view(ctx.dims[heads_key], ctx.dims["d_head"])
    name = f"blocks.{layer}.attn.{hook}"
    hook_viewed(ctx.graph, ctx.root, node, name, to_hook=to_hook, from_hook=from_hook,
                shape=("B", "S", heads_sym, "dh"), made_by="hook_qkv", scope=attn_path, hf_module=hf_module)
    ctx.aliases[f"blocks.{layer}.attn.{_ALIASES[hook]}"] = name


@graph_pass(expects=lambda spec, dims: 3 * dims["n_layers"])
def hook_qkv(ctx: PassContext) -> int:
    """Hook the separate q/k/v projection outputs, viewed per head."""
    spec = ctx.spec
    found = 0
    for layer in range(ctx.dims["n_layers"]):
        attn_path = spec.layer(layer, spec.attn)
        sources = [spec.layer(layer, f"{spec.attn}.{getattr(spec, which)}") for which, *_ in _QKV]
        nodes = [output_of(ctx.graph, path, "the projection's output") for path in sources]
        for node, source, (_, hook, heads_key, heads_sym) in zip(nodes, sources, _QKV):
            _hook_heads(ctx, node, layer, hook, heads_key, heads_sym, attn_path, source)
            found += 1
    return found
