"""Hook q/k/v per head on models whose layers may share keys/values or a k = v projection (Gemma 4).

    q = view(linear(x, W_Q), [B,S,H,dh])  ->  q = hook_q(view(...)) -> q_norm -> rope      (every layer)
    k = view(linear(x, W_K), [..Hkv,dh])  ->  k = hook_k(view(...)) -> k_norm -> rope      (layers owning k/v)
    v = view(linear(x, W_V), [..Hkv,dh])  ->  v = hook_v(view(...)) -> v_norm
k = v (``attention_k_eq_v``, no v projection): hook_v sits on the value path after hook_k, so an edit of
hook_k reaches keys and values (they are one projection), an edit of hook_v the values only. KV-shared layers
have no k/v projection, hence no hook_k / hook_v (their keys: ``route_shared_kv``). Head counts and sizes
may differ per layer (Gemma 4 global layers), so the hooks sit on HF's own per-head view, never a re-view.
"""
from __future__ import annotations

import torch
from torch import fx

from ..runtime.names import hook_name
from ..tracer.graph_facts import ModuleRegion, in_module
from .base import NoMatch, PassContext, graph_pass
from .graph_utils import NOTHING, hook_after, single

aten = torch.ops.aten
_NO_OPS = {aten.to.dtype, aten.alias.default, aten._to_copy.default}  # casts that keep value and dtype


def expected_hooks(spec, dims) -> int:
    """hook_q on every layer; hook_k and hook_v on the layers that compute their own keys and values."""
    n, shared = dims["n_layers"], dims.get("n_kv_shared_layers", 0)
    return n + 2 * (n - shared)


def layer_heads(config, layer: int) -> tuple[int, int, int]:
    """(H, Hkv, dh) of one layer from the HF config, honouring HF's per-layer overrides (``per_layer_config``)."""
    cfg = config
    overrides = getattr(config, "per_layer_config", None)
    if overrides is not None:
        try:
            cfg = overrides[layer]
        except (KeyError, IndexError, TypeError, ValueError):
            cfg = config
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    d_head = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return heads, kv, d_head


def _head_view(graph: fx.Graph, proj_path: str, attn_path: str, heads: int, d_head: int) -> fx.Node | None:
    """HF's ``proj(x).view(B, S, heads, d_head)`` of projection ``proj_path``; None when the layer has none."""
    out = ModuleRegion.of(graph, proj_path).output
    if out is None:
        return None
    view = single([u for u in out.users if in_module(u, attn_path) and _rank(u) == 4], "per-head view of its output",
                  proj_path)
    got = tuple(view.meta["val"].shape[-2:])
    if got != (heads, d_head):
        raise NoMatch(proj_path, f"a view as {(heads, d_head)} heads x head size (the config's)", f"{got}")
    return view


def _rank(node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else -1


def _value_entry(graph: fx.Graph, v_norm: str, k_hook: fx.Node) -> fx.Node:
    """What ``v_norm`` reads when v is the k projection: hook_k's output, possibly seen through a no-op cast.

    (In float32 HF's ``k.float()`` in k_norm returns k itself, so the graph has v_norm read k_norm's cast.)
    """
    entry = single(ModuleRegion.of(graph, v_norm).inputs, "input", v_norm)
    node = entry
    while node is not k_hook and node.op == "call_function" and node.target in _NO_OPS and _same_dtype(node):
        node = node.args[0]
    if node is not k_hook:
        raise NoMatch(v_norm, "the k projection as its input (attention_k_eq_v)", f"{entry.name}")
    return entry


def _same_dtype(node: fx.Node) -> bool:
    src = node.args[0]
    val = node.meta.get("val")
    want = src.meta.get("fxbridge_dtype") or getattr(src.meta.get("val"), "dtype", None)
    return isinstance(val, torch.Tensor) and str(val.dtype).replace("torch.", "") == str(want).replace("torch.", "")


def _hook(ctx, node, layer, hook, attn_path, source, users=None):
    return hook_after(ctx, node, hook_name(f"attn.{hook}", layer), scope=attn_path, users=users, hf_module=source)


@graph_pass(expects=lambda spec, dims, **_: expected_hooks(spec, dims))
def hook_shared_qkv(ctx: PassContext, *, v_norm: str) -> int:
    """Hook q/k/v projection outputs per head where layers may share k/v or compute v with the k projection.

    ``v_norm``: the value norm (relative to the attention module) that reads the k projection when k = v.
    """
    spec, graph = ctx.spec, ctx.graph
    n = ctx.dims["n_layers"]
    first_shared = n - ctx.dims.get("n_kv_shared_layers", 0)
    found = 0
    for layer in range(n):
        attn = spec.layer(layer, spec.attn)
        heads, kv_heads, d_head = layer_heads(ctx.config, layer)
        q = _head_view(graph, f"{attn}.{spec.q}", attn, heads, d_head)
        if q is None:
            raise NoMatch(f"{attn}.{spec.q}", "the q projection's output", NOTHING)
        _hook(ctx, q, layer, "hook_q", attn, f"{attn}.{spec.q}")
        found += 1
        k = _head_view(graph, f"{attn}.{spec.k}", attn, kv_heads, d_head)
        if k is None and layer < first_shared:
            raise NoMatch(f"{attn}.{spec.k}", "the k projection's output (a layer that computes its own keys)",
                          NOTHING)
        if k is None:  # a KV-shared layer: it reads another layer's keys and values
            continue
        v = _head_view(graph, f"{attn}.{spec.v}", attn, kv_heads, d_head)
        k_hook = _hook(ctx, k, layer, "hook_k", attn, f"{attn}.{spec.k}")
        found += 1
        if v is not None:
            _hook(ctx, v, layer, "hook_v", attn, f"{attn}.{spec.v}")
        else:  # k = v: the value path reads the (hooked) k projection through its own v_norm
            entry = _value_entry(graph, f"{attn}.{v_norm}", k_hook)
            value_readers = [u for u in entry.users if in_module(u, f"{attn}.{v_norm}")]
            v_hook = _hook(ctx, entry, layer, "hook_v", attn, f"{attn}.{spec.k}", users=value_readers)
            # fire just before the value path, after the key path has read the shared storage (in-place edits)
            first = min(value_readers)
            first.prepend(v_hook)
        found += 1
    return found
