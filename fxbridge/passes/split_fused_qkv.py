"""Split a fused QKV projection into explicit, hooked ``hook_q`` [B,S,H,dh], ``hook_k`` / ``hook_v`` [B,S,Hkv,dh].

    qkv = query_key_value(x)                    qkv = query_key_value(x)
    <HF's own split: views, slices, index,  ->  q, k, v = split(qkv, layout)            (views of qkv)
     broadcast to H heads, transposes>          q' = hook_q(q) ; k' = hook_k(k) ; v' = hook_v(v)
    ... attention(q_hf, k_hf, v_hf)              ... attention(q'^T, repeat(k')^T, repeat(v')^T)

The layout is data (``ArchSpec.qkv_layout``: "contiguous", "per_head", "per_group"; the einops forms are in
``architectures/qkv_layouts.py``). The size check comes first: (H + 2*Hkv) * dh features or an error naming them.
HF's split is not pattern-matched op by op. Instead every tensor HF derives from the fused output by
shape-only ops is evaluated once on an index probe (a fused tensor whose entries are their own positions);
a node whose probe equals q, k or v of the layout -- as [B,S,h,d] or [B,h,S,d], K/V possibly repeated to H
heads group-major -- *is* that value, and is replaced by the same expression of the hooked q/k/v. So the
layout is verified against HF's code, and edits to a KV head reach exactly the query heads of its group.
"""
from __future__ import annotations

import logging

import sympy
import torch
from torch import fx
from torch.utils._pytree import tree_map

from ..architectures.qkv_layouts import layout_steps, split_eager
from .base import PassContext, graph_pass
from .graph_utils import hook_after, module_nodes, module_output, scoped_meta

log = logging.getLogger(__name__)
aten = torch.ops.aten
_ALIASES = {"q": "q.hook_out", "k": "k.hook_out", "v": "v.hook_out"}
_CONST_OPS = {aten.lift_fresh_copy.default, aten.clone.default, aten.detach.default}


def _forms(role: str, n_heads: int, n_kv: int) -> list[tuple[str, bool]]:
    """How HF may hold a role: (layout of dims, repeated to H heads)."""
    forms = [("bshd", False), ("bhsd", False)]
    if role != "q" and n_kv < n_heads:
        forms += [("bshd", True), ("bhsd", True)]
    return forms


def _apply_form(x: torch.Tensor, form: str, repeat: int) -> torch.Tensor:
    if repeat > 1:  # group-major, as repeat_interleave: head h reads KV head h // repeat
        x = x.unsqueeze(3).expand(-1, -1, -1, repeat, -1).flatten(2, 3)
    return x.transpose(1, 2) if form == "bhsd" else x


class _Probe:
    """Evaluates shape-only code on concrete index tensors; symbolic sizes bound from the fused output's shape."""

    def __init__(self, root, fused: fx.Node, probe_sizes=(2, 3)):
        shape = fused.meta["val"].shape
        self.root, self.binding, self.consts, self.meta_consts, concrete = root, {}, set(), [], []
        for size, probe_size in zip(shape[:-1], probe_sizes):
            if isinstance(size, torch.SymInt):
                self.binding[size.node.expr] = sympy.Integer(probe_size)
            concrete.append(int(probe_size) if isinstance(size, torch.SymInt) else int(size))
        n = int(shape[-1])
        self.env = {fused: torch.arange(concrete[0] * concrete[1] * n, dtype=torch.float64).reshape(*concrete, n)}

    def value(self, node: fx.Node, depth: int = 2):
        if node in self.env:
            return self.env[node]
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt):
            expr = sympy.sympify(sympy.sympify(val.node.expr).xreplace(self.binding))
            if expr.free_symbols:
                raise LookupError(f"size {val} of {node.name} is not a function of the fused output's shape")
            return int(expr)
        if isinstance(val, (int, float, bool)):
            return val
        if node.op == "get_attr":
            self.consts.add(node)
            value = _fetch(self.root, node.target)
            if isinstance(value, torch.Tensor) and value.is_meta:
                self.meta_consts.append(node.target)
                raise LookupError(f"constant {node.target} was captured on the meta device: its values are lost")
            return value
        if node.op == "call_function" and node.target in _CONST_OPS and depth > 0:
            self.consts.add(node)
            return node.target(*tree_map(lambda a: self.value(a, depth - 1) if isinstance(a, fx.Node) else a,
                                         node.args))
        raise LookupError(f"{node.name} is not computed from the fused output alone")

    def run(self, node: fx.Node):
        args, kwargs = tree_map(lambda a: self.value(a) if isinstance(a, fx.Node) else a, (node.args, node.kwargs))
        return node.target(*args, **kwargs)


def _fetch(root, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _check_size(fused: fx.Node, layout: str, dims: dict, what: str) -> None:
    n = int(fused.meta["val"].shape[-1])
    h, g, d = dims["n_heads"], dims["n_kv_heads"], dims["d_head"]
    if n != (h + 2 * g) * d:
        raise ValueError(f"the fused projection {what} has {n} output features, but qkv_layout {layout!r} with "
                         f"H={h}, Hkv={g}, dh={d} needs (H + 2*Hkv)*dh = {(h + 2 * g) * d}; sizes [H*dh, Hkv*dh, "
                         f"Hkv*dh] = [{h * d}, {g * d}, {g * d}]")


def _match_region(fused, probe, candidates, attn_path) -> list[tuple[fx.Node, tuple]]:
    """HF nodes derived from ``fused`` by shape-only code whose probe equals a candidate (nearest ones only)."""
    matches = []
    for node in module_nodes(fused.graph, attn_path):  # graph order; nodes before fused read nothing of it
        if node.op != "call_function" or not any(a in probe.env for a in node.all_input_nodes):
            continue
        try:
            out = probe.run(node)
        except Exception:  # not shape-only code (reads other tensors): a consumer, not part of the split
            continue
        if isinstance(out, (tuple, list)):
            probe.env[node] = out
            continue
        if not isinstance(out, torch.Tensor):
            continue
        hit = next((key for key, cand in candidates.items() if cand.shape == out.shape and torch.equal(cand, out)),
                   None)
        if hit is None:
            probe.env[node] = out
        else:
            matches.append((node, hit))
    return matches


def split_layer(ctx: PassContext, layer: int) -> int:
    """Split and hook one layer's fused projection; returns the number of hooks made (3)."""
    spec, dims, graph = ctx.spec, ctx.dims, ctx.graph
    attn_path = spec.layer(layer, spec.attn)
    qkv_path = spec.layer(layer, f"{spec.attn}.{spec.qkv}")
    fused = module_output(graph, qkv_path)
    if fused is None:
        raise LookupError(f"no output found for the fused projection {qkv_path}")
    _check_size(fused, spec.qkv_layout, dims, qkv_path)
    h, g, d = dims["n_heads"], dims["n_kv_heads"], dims["d_head"]
    probe = _Probe(ctx.root, fused)
    canon = split_eager(probe.env[fused], spec.qkv_layout, h, g, d)
    candidates = {(role, form, rep): _apply_form(canon[role], form, h // g if rep else 1)
                  for role in "qkv" for form, rep in _forms(role, h, g)}
    matches = _match_region(fused, probe, candidates, attn_path)
    found_roles = {key[0] for _, key in matches}
    if found_roles != set("qkv") and probe.meta_consts:
        raise NotImplementedError(f"HF's split of {qkv_path} indexes with constants {probe.meta_consts} whose values a "
                                  "capture on the meta device does not keep; trace this model on a real device")
    if found_roles != set("qkv"):
        raise LookupError(f"HF's split of {qkv_path} does not produce {sorted(set('qkv') - found_roles)} in the "
                          f"{spec.qkv_layout!r} layout (H={h}, Hkv={g}, dh={d}); is qkv_layout right?")
    hooked = _insert_split(ctx, fused, layer, attn_path, qkv_path)
    exprs: dict[tuple, fx.Node] = {}
    for node, key in matches:
        if key not in exprs:
            exprs[key] = _emit_form(graph, hooked[key[0]], key[1], h // g if key[2] else 1, node)
        node.replace_all_uses_with(exprs[key])
    _erase_dead(graph, [*probe.env, *(node for node, _ in matches), *probe.consts], keep=fused)
    stray = [u.name for u in fused.users if u.meta.get("fxbridge_pass") != "split_fused_qkv"]
    if stray:
        raise LookupError(f"HF still reads the fused output of {qkv_path} through {stray}, outside the layout")
    return 3


def _insert_split(ctx, fused, layer, attn_path, qkv_path) -> dict[str, fx.Node]:
    graph, dims = ctx.graph, ctx.dims
    unflat, parts = layout_steps(ctx.spec.qkv_layout, dims["n_heads"], dims["n_kv_heads"], dims["d_head"])
    meta = scoped_meta(fused, attn_path)
    with graph.inserting_after(fused):
        grid = graph.call_function(aten.unflatten.int, (fused, *unflat))
    _tag(grid, meta)
    hooked, last = {}, grid
    for role, steps in parts.items():
        x = grid
        for op, args in steps:
            with graph.inserting_after(last):
                x = last = graph.call_function(op, (x, *args))
            _tag(x, meta)
        name = f"blocks.{layer}.attn.hook_{role}"
        heads = "H" if role == "q" else "Hkv"
        last = hooked[role] = hook_after(graph, ctx.root, x, name, shape=("B", "S", heads, "dh"),
                                         made_by="split_fused_qkv", scope=attn_path, users=[], hf_module=qkv_path)
        ctx.aliases[f"blocks.{layer}.attn.{_ALIASES[role]}"] = name
    return hooked


def _emit_form(graph, x, form: str, repeat: int, before: fx.Node) -> fx.Node:
    meta = scoped_meta(x, None)
    with graph.inserting_before(before):
        if repeat > 1:
            x = _tag(graph.call_function(aten.unsqueeze.default, (x, 3)), meta)
            x = _tag(graph.call_function(aten.expand.default, (x, [-1, -1, -1, repeat, -1])), meta)
            x = _tag(graph.call_function(aten.flatten.using_ints, (x, 2, 3)), meta)
        if form == "bhsd":
            x = _tag(graph.call_function(aten.transpose.int, (x, 1, 2)), meta)
    return x


def _tag(node: fx.Node, meta: dict) -> fx.Node:
    node.meta.update({k: dict(v) if isinstance(v, dict) else v for k, v in meta.items()})
    node.meta["fxbridge_pass"] = "split_fused_qkv"
    return node


def _erase_dead(graph, nodes, keep: fx.Node) -> None:
    """Erase HF's split nodes (and the constants only they read) once nothing reads them any more."""
    candidates = set(nodes)
    for node in reversed(list(graph.nodes)):
        if node in candidates and node is not keep and not node.users:
            graph.erase_node(node)


@graph_pass(expects=lambda spec, dims: 3 * dims["n_layers"])
def split_fused_qkv(ctx: PassContext) -> int:
    """Split fused QKV projections by the spec's layout into hook_q / hook_k / hook_v."""
    return sum(split_layer(ctx, layer) for layer in range(ctx.dims["n_layers"]))
