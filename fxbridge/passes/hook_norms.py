"""Give every norm TransformerLens's ``hook_scale`` [B,S,1] and ``hook_normalized`` [B,S,D].

RMSNorm (HF writes ``x * rsqrt(mean(x^2) + eps)``; Gemma's ``(1 + w)`` comes after and is untouched):
    r = rsqrt(v) ; y = mul(x, r)          ->   y = blocks.i.ln1(x, v)         (RMSNormCore)
LayerNorm:
    y = layer_norm(x, shape, w, b, eps)   ->   y = blocks.i.ln1(x, w, b)      (LayerNormCore)
LayerNorm written by hand (Cohere: c = x - mean(x) ; v = mean(c^2) + eps ; c * rsqrt(v), then the weight):
    r = rsqrt(v) ; y = mul(c, r)          ->   y = blocks.i.ln1(c, v)         (RMSNormCore of the centred x:
                                               hook_scale = sqrt(var + eps), hook_normalized = (x - mean) / scale)
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
_FORMS = {"rms": "x * rsqrt(mean(x^2) + eps) (RMSNorm)",
          "layernorm": "a layer_norm call, or (x - mean(x)) * rsqrt(mean((x - mean(x))^2) + eps)"}
_SUBS = {aten.sub.Tensor}
_MEANS = {aten.mean.dim}


def _is_inv_sqrt(node) -> bool:
    """``rsqrt(v)``, or ``pow(v, -0.5)`` as Gemma 4 writes it (ATen computes both as rsqrt: bit-identical)."""
    return node.target == aten.rsqrt.default or (node.target == aten.pow.Tensor_Scalar and node.args[1] == -0.5)


def norm_sites(spec, dims, sub_norms=()) -> list[tuple[str, str]]:
    """(hook prefix, HF module path) of every norm the spec names, and of the per-layer ``sub_norms``
    ((prefix relative to ``blocks.{i}``, HF path relative to the layer) pairs, a ``hook_norms`` parameter)."""
    sites = [] if spec.embed_norm is None else [("ln_embed", spec.embed_norm)]
    for layer in range(dims["n_layers"]):
        for short in ("ln1", "ln2", "ln1_post", "ln2_post"):
            rel = getattr(spec, short)
            if rel is not None:
                sites.append((f"blocks.{layer}.{short}", spec.layer(layer, rel)))
        sites += [(f"blocks.{layer}.{short}", spec.layer(layer, rel)) for short, rel in sub_norms]
    if spec.final_norm is not None:
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
        install(ctx.root, prefix, LayerNormCore(shape, eps, affine=weight is not None or bias is not None))
        _replace(ctx, ln, prefix, (x, weight, bias), ln.meta)
        return True
    return False


def _is_centred(node) -> bool:
    """``x - mean(x, -1, keepdim=True)``."""
    if node.op != "call_function" or node.target not in _SUBS or len(node.args) != 2:
        return False
    x, mean = node.args
    if not isinstance(mean, torch.fx.Node) or mean.target not in _MEANS or mean.args[0] is not x:
        return False
    last = x.meta["val"].dim() - 1
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    return keepdim and [d % (last + 1) for d in mean.args[1]] == [last]


def _rewrite_centred_layer_norm(ctx, prefix, nodes) -> bool:
    """LayerNorm written out: ``(x - mean) * rsqrt(mean((x - mean)^2) + eps)`` becomes an RMSNormCore of the
    centred x (the same expression; the core's hooks are LayerNorm's scale and normalized)."""
    for r in (n for n in nodes if _is_inv_sqrt(n)):
        users = list(r.users)
        if len(users) != 1 or users[0].target not in _MULS:
            continue
        mul = users[0]
        centred = mul.args[0] if mul.args[1] is r else mul.args[1]
        if not (isinstance(centred, torch.fx.Node) and _is_centred(centred)):
            continue
        # the variance is computed from the same centred value (HF may write x - mean twice)
        if not any(_reads(r.args[0], c) for c in centred.args[1].users if c.target in _SUBS and c.args == centred.args):
            continue
        install(ctx.root, prefix, RMSNormCore())
        _replace(ctx, mul, prefix, (centred, r.args[0]), mul.meta)
        ctx.graph.erase_node(r)
        return True
    return False


def _rewrite_any_layer_norm(ctx, prefix, nodes) -> bool:
    return _rewrite_layer_norm(ctx, prefix, nodes) or _rewrite_centred_layer_norm(ctx, prefix, nodes)


@graph_pass(expects=lambda spec, dims, sub_norms=(): len(norm_sites(spec, dims, sub_norms)))
def hook_norms(ctx: PassContext, *, sub_norms: tuple[tuple[str, str], ...] = ()) -> int:
    """Replace each norm's normalisation by a core with hook_scale / hook_normalized.

    ``sub_norms``: more per-layer norms, ``(hook prefix under blocks.{i}, HF path under the layer)`` (BitNet:
    ``("attn.ln_sub", "self_attn.attn_sub_norm")``)."""
    rewrite = {"rms": _rewrite_rms, "layernorm": _rewrite_any_layer_norm}[ctx.spec.norm]
    found = 0
    for prefix, path in norm_sites(ctx.spec, ctx.dims, sub_norms):
        nodes = ModuleRegion.of(ctx.graph, path).nodes
        if prefix == "ln_final":  # a final norm HF also calls earlier (nanochat normalises the embeddings with it):
            nodes = nodes[::-1]   # ln_final is its last call, the one the unembedding reads
        if not rewrite(ctx, prefix, nodes):
            raise NoMatch(path, _FORMS[ctx.spec.norm], f"none among its {len(nodes)} nodes")
        core = ctx.root.get_submodule(prefix)
        core.hf_path = path  # what a user's call of the core alone runs (TL's model.ln_final(x)), see cores.py
        for point in core.children():
            point.made_by, point.hf_module = ctx.current_pass, path
        found += 1
    return found
