"""Hook the query/key/value projection outputs per head (``hook_q`` [B,S,H,dh], ``hook_k``/``hook_v`` [B,S,Hkv,dh]).

Separate projections:                    Fused projection (layout from the spec):
    q = linear(x, W_Q)                      qkv = c_attn(x); q, k, v = split(qkv, [H*dh, Hkv*dh, Hkv*dh])
->  q = flatten(hook_q(unflatten(q)))   ->  q = flatten(hook_q(unflatten(q))), same for k and v
Both are views: nothing is copied, and the projection weights stay HF's.
"""
import torch

from .base import PassContext, graph_pass
from .graph_utils import heads_view, hook_viewed, module_output, single

aten = torch.ops.aten
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}

_QKV = (("q", "hook_q", "n_heads", "H"), ("k", "hook_k", "n_kv_heads", "Hkv"), ("v", "hook_v", "n_kv_heads", "Hkv"))
_ALIASES = {"hook_q": "q.hook_out", "hook_k": "k.hook_out", "hook_v": "v.hook_out"}


def _hook_heads(ctx, node, layer, hook, heads_key, heads_sym, attn_path, hf_module):
    to_hook, from_hook = heads_view(ctx.dims[heads_key], ctx.dims["d_head"])
    name = f"blocks.{layer}.attn.{hook}"
    hook_viewed(ctx.graph, ctx.root, node, name, to_hook=to_hook, from_hook=from_hook,
                shape=("B", "S", heads_sym, "dh"), made_by="hook_qkv", scope=attn_path, hf_module=hf_module)
    ctx.aliases[f"blocks.{layer}.attn.{_ALIASES[hook]}"] = name


def _fused_parts(ctx, layer: int) -> list:
    """The q, k, v outputs of the fused projection of one layer, in that order."""
    spec, dims = ctx.spec, ctx.dims
    qkv_path = spec.layer(layer, f"{spec.attn}.{spec.qkv}")
    out = module_output(ctx.graph, qkv_path)
    if out is None:
        raise LookupError(f"no output found for the fused projection {qkv_path}")
    if spec.qkv_layout != "contiguous":
        raise NotImplementedError(f"qkv_layout {spec.qkv_layout!r} needs the split_fused_qkv pass")
    split = single([u for u in out.users if u.target in _SPLITS], f"split of {qkv_path}")
    sizes = [dims["n_heads"] * dims["d_head"], dims["n_kv_heads"] * dims["d_head"], dims["n_kv_heads"] * dims["d_head"]]
    size_arg = split.args[1]
    got = [size_arg] * 3 if isinstance(size_arg, int) else list(size_arg)
    if got != sizes:
        raise ValueError(f"split sizes {got} of {qkv_path} differ from [H*dh, Hkv*dh, Hkv*dh] = {sizes}")
    items = {u.args[1]: u for u in split.users if u.target.__name__ == "getitem"}
    if sorted(items) != [0, 1, 2]:
        raise LookupError(f"the split of {qkv_path} is used as items {sorted(items)}, expected 0, 1, 2")
    return [items[0], items[1], items[2]]


@graph_pass(expects=lambda spec, dims: 3 * dims["n_layers"])
def hook_qkv(ctx: PassContext) -> int:
    """Hook q/k/v projection outputs, viewed per head, for separate or contiguously fused projections."""
    spec = ctx.spec
    found = 0
    for layer in range(ctx.dims["n_layers"]):
        attn_path = spec.layer(layer, spec.attn)
        if spec.qkv is not None:
            nodes = _fused_parts(ctx, layer)
            sources = [spec.layer(layer, f"{spec.attn}.{spec.qkv}")] * 3
        else:
            sources = [spec.layer(layer, f"{spec.attn}.{getattr(spec, which)}") for which, *_ in _QKV]
            nodes = [module_output(ctx.graph, path) for path in sources]
        for node, source, (_, hook, heads_key, heads_sym) in zip(nodes, sources, _QKV):
            if node is None:
                continue
            _hook_heads(ctx, node, layer, hook, heads_key, heads_sym, attn_path, source)
            found += 1
    return found
