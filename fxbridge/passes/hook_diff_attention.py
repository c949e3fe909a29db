"""Differential attention (DiffLlama): the two attention calls of a layer become one core with the maps' difference.

HF (transformers 5.15 .. 5.24, ``DiffLlamaAttention``) calls the attention function twice with the same q/k and
mask and the two halves of V (``v1, v2 = (h.repeat(1, 2, 1, 1) for h in chunk(v, 2, dim=1))``), then
    z = cat([attn(q, k, v1), attn(q, k, v2)], -1)         [B,S,H,2dh]: query head h over both value halves
    z1, z2 = chunk(z, 2, dim=2)                           heads j < H/2 and their partners j + H/2
    d = z1 - lam * z2                                     [B,S,H/2,2dh] = (A_j - lam A_{j+H/2}) @ [v1|v2]
    out = o_proj(((1 - lambda_init) * groupnorm(d)).reshape(B, S, H*dh))
->  lam = hook_lambda(lam viewed [1])
    d = blocks.i.attn(rot_q, rot_k, v1, v2, mask, lam)    (DiffAttentionCore: hook_attn_scores [B,H,S,S],
                                                           hook_pattern [B,H,S,S] (both maps), hook_diff_pattern
                                                           [B,H/2,S,S] = A_j - lam A_{j+H/2})
    d = hook_diff(d)                                      [B,S,H/2,2dh]
    o_proj input viewed [B,S,H,dh] = hook_z
The core runs HF's two fused SDPA calls and ``z1 - lam * z2`` while nothing is hooked, one eager softmax over
[v1|v2] when a score / pattern hook is attached; with
``hook_diff_pattern`` hooked it multiplies the (edited) difference map with the values, which equals HF's
combination (both heads of a pair read the same value head: checked from the graph's chunk/repeat).
"""
from __future__ import annotations

import torch
from torch import fx

from ..runtime.attention import fused_attention
from ..runtime.hook_point import FastCallModule, HookPoint
from ..runtime.names import hook_name
from ..tracer.attention_op import AttentionCall
from ..tracer.graph_facts import ModuleRegion, scoped_meta
from .base import NoMatch, PassContext, graph_pass
from .graph_utils import SWAP_HEADS_POS, heads_view, hook_after, hook_viewed, install, output_of
from .hook_attention import _is_rotated, _layer_of

aten = torch.ops.aten


class DiffAttentionCore(FastCallModule):
    """(softmax(q k^T * scale + mask)[:H/2] - lam * softmax(...)[H/2:]) @ [v1|v2] for one layer.

    q [B,H,S,dh], k [B,Hkv,S,dh], v1 / v2 [B,Hkv,S,dh], lam a 0-dim tensor -> d [B,S,H/2,2dh].
    """

    KV_INPUTS, MASK_INPUT = (1, 2, 3), 4  # what KV-cached decoding caches and re-masks (runtime/decode.py)

    def __init__(self, scaling: float, layer: int):
        super().__init__()
        self.scaling, self.layer = float(scaling), layer
        self.force_eager = False
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_diff_pattern = HookPoint()

    def needs_eager(self) -> bool:
        return (self.force_eager or self.hook_attn_scores.has_hooks or self.hook_pattern.has_hooks
                or self.hook_diff_pattern.has_hooks)

    def forward(self, q, k, v1, v2, mask, lam):
        if not self.needs_eager():  # HF's two calls (equal head sizes keep SDPA on its fast kernels), HF's combination
            z = torch.cat([fused_attention(q, k, v1, mask, self.scaling), fused_attention(q, k, v2, mask, self.scaling)],
                          dim=-1)
            z1, z2 = torch.chunk(z, 2, dim=2)
            return z1 - lam * z2
        v = torch.cat([v1, v2], dim=-1)
        n_rep = q.shape[1] // k.shape[1]  # HF's eager attention: repeat_kv, q k^T * scale + mask, fp32 softmax
        if n_rep > 1:
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        if mask is not None:
            scores = scores + mask
        scores = self.hook_attn_scores(scores)
        pattern = self.hook_pattern(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
        half = pattern.shape[1] // 2
        if not self.hook_diff_pattern.has_hooks:  # HF's order: each map times V, then the difference
            z = torch.matmul(pattern, v).transpose(1, 2)
            z1, z2 = torch.chunk(z, 2, dim=2)
            return z1 - lam * z2
        diff = self.hook_diff_pattern(pattern[:, :half] - lam * pattern[:, half:])
        return torch.matmul(diff, v[:, :half]).transpose(1, 2)  # heads j and j + H/2 read the same value rows

    def fake_values(self, q, k, v1, v2, mask, lam):
        batch, heads, q_len, _ = q.shape
        scores_dtype = torch.promote_types(q.dtype, k.dtype)
        if mask is not None:
            scores_dtype = torch.promote_types(scores_dtype, mask.dtype)
        scores = q.new_empty((batch, heads, q_len, k.shape[2]), dtype=scores_dtype)
        pattern = q.new_empty(scores.shape, dtype=q.dtype)
        diff = q.new_empty((batch, heads // 2, q_len, k.shape[2]), dtype=torch.promote_types(q.dtype, lam.dtype))
        out = q.new_empty((batch, q_len, heads // 2, v1.shape[-1] + v2.shape[-1]),
                          dtype=torch.promote_types(torch.promote_types(q.dtype, v1.dtype), lam.dtype))
        return out, {"hook_attn_scores": scores, "hook_pattern": pattern, "hook_diff_pattern": diff}

    def extra_repr(self) -> str:
        return f"layer={self.layer}, scaling={self.scaling:.4g}"


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _getitem_of(node, index: int):
    """``src`` where ``node`` is ``src[index]`` (a getitem of a multi-output op), else None."""
    if isinstance(node, fx.Node) and node.op == "call_function" and getattr(node.target, "__name__", "") == "getitem" \
            and node.args[1] == index:
        return node.args[0]
    return None


def _value_halves(v1, v2, where: str) -> fx.Node:
    """The value tensor both halves come from: ``v_i = chunk(v, 2, dim=1)[i].repeat(1, 2, 1, 1)``."""
    srcs = []
    for i, vi in enumerate((v1, v2)):
        chunk = _getitem_of(vi.args[0], i) if _is(vi, aten.repeat.default) and list(vi.args[1]) == [1, 2, 1, 1] \
            else None
        if not _is(chunk, aten.chunk.default) or tuple(chunk.args[1:]) != (2, 1):
            raise NoMatch(where, "the two value inputs chunk(v, 2, dim=1)[i].repeat(1, 2, 1, 1)", f"{vi.name}")
        srcs.append(chunk)
    if srcs[0] is not srcs[1]:
        raise NoMatch(where, "both value halves from one chunk of v", f"{srcs[0].name}, {srcs[1].name}")
    return srcs[0]


def _combination(out1, out2, where: str):
    """HF's ``z1 - lam * z2`` after ``z1, z2 = chunk(cat([out1, out2], -1), 2, dim=2)``: (the sub node, lam)."""
    cats = [u for u in out1.users if _is(u, aten.cat.default) and list(u.args[0]) == [out1, out2]
            and (u.args[1] if len(u.args) > 1 else 0) in (-1, 3)]
    chunks = [c for u in cats for c in u.users if _is(c, aten.chunk.default) and tuple(c.args[1:]) == (2, 2)]
    if len(chunks) != 1:
        raise NoMatch(where, "chunk(cat([attn1, attn2], -1), 2, dim=2)", f"{len(chunks)} such chunk(s)")
    items = {u.args[1]: u for u in chunks[0].users if _getitem_of(u, u.args[1]) is chunks[0]}
    if set(items) != {0, 1}:
        raise NoMatch(where, "both halves of the head chunk used", f"items {sorted(items)}")
    z1, z2 = items[0], items[1]
    for sub in z1.users:
        if not _is(sub, aten.sub.Tensor) or sub.args[0] is not z1:
            continue
        mul = sub.args[1]
        if _is(mul, aten.mul.Tensor) and z2 in mul.args and len(mul.users) == 1:
            lam = mul.args[1] if mul.args[0] is z2 else mul.args[0]
            val = lam.meta.get("val") if isinstance(lam, fx.Node) else None
            if isinstance(val, torch.Tensor) and val.dim() == 0:
                return sub, lam
    raise NoMatch(where, "z1 - lam * z2 with a scalar lam (the differential combination)", "no such subtraction")


def _o_proj_input(graph, o_path: str, where: str) -> fx.Node:
    region = ModuleRegion.of(graph, o_path)
    if len(region.inputs) != 1:
        raise NoMatch(o_path, "one input of the output projection", f"{len(region.inputs)}")
    return region.inputs[0]


@graph_pass(expects=lambda spec, dims: dims["n_layers"])
def hook_diff_attention(ctx: PassContext) -> int:
    """Merge each layer's two attention calls into a DiffAttentionCore; hook lambda, the difference and hook_z."""
    spec, graph, dims = ctx.spec, ctx.graph, ctx.dims
    by_layer: dict[int, list[AttentionCall]] = {}
    for call in AttentionCall.find(graph):
        by_layer.setdefault(_layer_of(call, spec.layers), []).append(call)
    done = 0
    for layer in range(dims["n_layers"]):
        attn_path = spec.layer(layer, spec.attn)
        calls = by_layer.get(layer, [])
        if len(calls) != 2:
            raise NoMatch(attn_path, "two attention calls (differential attention)", f"{len(calls)}")
        first, second = calls
        if (first.q, first.k, first.mask, first.scaling) != (second.q, second.k, second.mask, second.scaling) \
                or first.softcap is not None or second.softcap is not None:
            raise NoMatch(attn_path, "two attention calls sharing q, k, mask and scale, no softcap",
                          f"{first.node.name} and {second.node.name} differ")
        _value_halves(first.v, second.v, attn_path)
        sub, lam = _combination(first.node, second.node, attn_path)
        rotated = spec.rotary and _is_rotated(first.q, ModuleRegion.of(graph, attn_path))

        name = f"blocks.{layer}.attn"
        core_module = DiffAttentionCore(first.scaling, layer)
        for point in core_module.children():
            point.made_by, point.hf_module = ctx.current_pass, attn_path
        install(ctx.root, name, core_module)
        with graph.inserting_before(sub):
            core = graph.call_module(name, (first.q, first.k, first.v, second.v, first.mask, lam))
        core.meta.update(scoped_meta(sub, attn_path))
        core.meta["fxbridge_pass"] = ctx.current_pass
        sub.replace_all_uses_with(core)
        mul = sub.args[1]
        graph.erase_node(sub)
        graph.erase_node(mul)
        for dead in (first.node, second.node):  # cat -> chunk -> getitems, then the calls
            _erase_unused_from(graph, dead)

        hook_viewed(ctx, lam, hook_name("attn.hook_lambda", layer), to_hook=(aten.view.default, ([1],)),
                    from_hook=(aten.view.default, ([],)), scope=attn_path, users=[core], hf_module=attn_path)
        if rotated:
            for arg, hook in ((first.q, "attn.hook_rot_q"), (first.k, "attn.hook_rot_k")):
                hook_viewed(ctx, arg, hook_name(hook, layer), to_hook=SWAP_HEADS_POS[0], from_hook=SWAP_HEADS_POS[1],
                            scope=attn_path, users=[core], hf_module=attn_path)
        hook_after(ctx, core, hook_name("attn.hook_diff", layer), scope=attn_path, hf_module=attn_path)
        o_path = spec.layer(layer, f"{spec.attn}.{spec.o_proj}")
        z = _o_proj_input(graph, o_path, o_path)
        to_hook, from_hook = heads_view(dims["n_heads"], dims["d_head"])
        hook_viewed(ctx, z, hook_name("attn.hook_z", layer), to_hook=to_hook, from_hook=from_hook, scope=attn_path,
                    users=[u for u in z.users if u in ModuleRegion.of(graph, o_path)], hf_module=o_path)
        done += 1
    return done


def _erase_unused_from(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` and the users it alone feeds, once nothing reads them (dead after the rewrite)."""
    todo = [node]
    order: list[fx.Node] = []
    seen = set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        order.append(n)
        todo.extend(n.users)
    for n in sorted(order, reverse=True):  # users first (nodes order by graph position)
        if not n.users and n.op == "call_function":
            graph.erase_node(n)
