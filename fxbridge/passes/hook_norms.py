"""Give every norm TransformerLens's ``hook_scale`` [B,S,1] and ``hook_normalized`` [B,S,D].

RMSNorm (HF writes ``x * rsqrt(mean(x^2) + eps)``; Gemma's ``(1 + w)`` comes after and is untouched):
    r = rsqrt(v) ; y = mul(x, r)          ->   y = blocks.i.ln1(x, v)         (RMSNormCore)
LayerNorm:
    y = layer_norm(x, shape, w, b, eps)   ->   y = blocks.i.ln1(x, w, b)      (LayerNormCore)
The cores run HF's fused expression unless a norm hook is attached, then split it into scale and normalized.
"""
import torch

from ..runtime.cores import LayerNormCore, RMSNormCore
from ..tracer.graph_facts import ModuleRegion
from .base import NoMatch, PassContext, graph_pass
from .graph_utils import install

aten = torch.ops.aten
_LAYER_NORMS = {aten.layer_norm.default}
_MULS = {aten.mul.Tensor}
_FORMS = {"rms": "x * rsqrt(mean(x^2) + eps) (RMSNorm)", "layernorm": "a layer_norm call"}


def _is_inv_sqrt(node) -> bool:
    """``rsqrt(v)``, or ``pow(v, -0.5)`` as Gemma 4 writes it (ATen computes both as rsqrt: bit-identical)."""
    return node.target == aten.rsqrt.default or (node.target == aten.pow.Tensor_Scalar and node.args[1] == -0.5)


def norm_sites(spec, dims) -> list[tuple[str, str]]:
    """(hook prefix, HF module path) of every norm the spec names."""
    sites = []
    for layer in range(dims["n_layers"]):
        for short in ("ln1", "ln2", "ln1_post", "ln2_post"):
            rel = getattr(spec, short)
            if rel is not None:
                sites.append((f"blocks.{layer}.{short}", spec.layer(layer, rel)))
    sites.append(("ln_final", spec.final_norm))
    return sites


def _reads(node, target, depth: int = 4) -> bool:
    """Whether ``node`` is computed from ``target`` within ``depth`` steps up the use-def chain."""
    if node is target:
        return True
    return depth > 0 and any(_reads(arg, target, depth - 1) for arg in node.all_input_nodes)


def _replace(ctx, old, target, args, meta):
    graph = ctx.graph
    with graph.inserting_before(old):
        new = graph.call_module(target, args)
    new.meta.update(meta)
    new.meta["fxbridge_pass"] = ctx.current_pass
    old.replace_all_uses_with(new)
    graph.erase_node(old)
    return new


def _rewrite_rms(ctx, prefix, nodes) -> bool:
    for r in (n for n in nodes if _is_inv_sqrt(n)):
        users = list(r.users)
        if len(users) != 1 or users[0].target not in _MULS:
            continue
        mul = users[0]
        x = mul.args[0] if mul.args[1] is r else mul.args[1]
        var_eps = r.args[0]
        if not _reads(var_eps, x):  # the variance must be computed from the value being normalised
            continue
        install(ctx.root, prefix, RMSNormCore())
        _replace(ctx, mul, prefix, (x, var_eps), mul.meta)
        ctx.graph.erase_node(r)
        return True
    return False


def _rewrite_layer_norm(ctx, prefix, nodes) -> bool:
    for ln in (n for n in nodes if n.target in _LAYER_NORMS):
        x, shape, weight, bias, eps = (list(ln.args) + [None, None, ln.kwargs.get("eps", 1e-5)])[:5]
        install(ctx.root, prefix, LayerNormCore(shape, eps))
        _replace(ctx, ln, prefix, (x, weight, bias), ln.meta)
        return True
    return False


@graph_pass(expects=lambda spec, dims: len(norm_sites(spec, dims)))
def hook_norms(ctx: PassContext) -> int:
    """Replace each norm's normalisation by a core with hook_scale / hook_normalized."""
    rewrite = {"rms": _rewrite_rms, "layernorm": _rewrite_layer_norm}[ctx.spec.norm]
    found = 0
    for prefix, path in norm_sites(ctx.spec, ctx.dims):
        nodes = ModuleRegion.of(ctx.graph, path).nodes
        if prefix == "ln_final":  # its module's last call (NanoChat also normalises the embeddings with it)
            nodes = nodes[::-1]
        if not rewrite(ctx, prefix, nodes):
            raise NoMatch(path, _FORMS[ctx.spec.norm], f"none among its {len(nodes)} nodes")
        core = ctx.root.get_submodule(prefix)
        for point in core.children():
            point.made_by, point.hf_module = ctx.current_pass, path
        found += 1
    return found
