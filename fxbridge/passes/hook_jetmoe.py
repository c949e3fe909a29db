"""JetMoE: hook the mixture of attention heads (``JetMoeMoA``) and the MoE MLP (``JetMoeMoE``).

Both run HF's ``JetMoeTopKGating`` on the flattened tokens x [N,D] (N = B*S, E experts, top K):
    l = router.layer(x) ; w, idx = topk(l, K) ; g = softmax(w)                      [N,E], [N,K], [N,K]
    rows sorted by expert (``sorted``: for each sorted row its flat (token, slot) index t*K + k), then
    y_sorted = output_linear(...) * g[sorted]  ;  out = zeros(N, D).index_add(0, sorted // K, y_sorted) + bias
->  l, idx, g are hooked seen as [B,S,E] / [B,S,K] / [B,S,K] (views: in-place edits propagate), and
    slots = zeros(N*K, D).index_copy(0, sorted, y_sorted).view(B,S,K,D) -> hook_expert_out -> sum over K
    replaces the index_add (the same sum: with K = 2 bit-identical, beyond that up to float rounding).
The attention (``prefix`` ``attn``): q = the K query experts' outputs [B,S,K*Hkv*dh] seen as [B,S,H,dh]
(H = K*Hkv, head ``k*Hkv + j`` = slot k over key/value head j), k / v the halves of the shared ``kv_proj`` seen
as [B,S,Hkv,dh], rotary, then HF repeats k and v K times (``repeat``, not interleave) before the attention call:
``hook_rot_k`` is the rotated key before that repeat. The call becomes an ``AttentionCore`` (hook_attn_scores,
hook_pattern, hook_z [B,S,H,dh]); its output goes to the output experts (``reduce``), whose weighted slots are
``attn.hook_expert_out``. The MLP: ``mlp.hook_router_logits`` ... ``mlp.hook_expert_out``.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..runtime.cores import AttentionCore
from ..runtime.names import hook_name
from ..tracer.attention_op import AttentionCall
from ..tracer.graph_facts import ModuleRegion, scoped_meta
from .base import NoMatch, PassContext, graph_pass
from .graph_utils import (SWAP_HEADS_POS, first_tensor, heads_view, hook_after, hook_viewed, install, output_of, single,
                          token_dims)
from .hook_attention import _layer_of

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
PER_LAYER = 1


def _rank(node) -> int:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else -1


def _float(node) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _item(node: fx.Node, index: int, where: str) -> fx.Node:
    return single([u for u in node.users if u.target is operator.getitem and u.args[1] == index],
                  f"item {index} of {node.name}", where)


def _token_rows(ctx, node, name, bs, *, scope, hf_module, users=None):
    """Hook token-major ``node`` [N,X] seen as [B,S,X]."""
    b, s = bs
    width = node.meta["val"].shape[-1]
    return hook_viewed(ctx, node, name, to_hook=(aten.view.default, ([b, s, width],)),
                       from_hook=(aten.view.default, ([-1, width],)), scope=scope, users=users, hf_module=hf_module)


def _hook_router(ctx, prefix: str, layer: int, router: str, bs) -> fx.Node:
    """Hook the gating's logits, chosen experts and gates; returns the sorted (token, slot) index."""
    graph = ctx.graph
    region = ModuleRegion.of(graph, router)
    logits = output_of(graph, f"{router}.layer", "the router projection's output")
    topk = single([n for n in region.nodes if n.target is aten.topk.default], "topk", router)
    indices = _item(topk, 1, router)
    flats = [n for n in region.nodes if n.target is aten.flatten.using_ints]
    gates = single([f.args[0] for f in flats if _float(f.args[0]) and _rank(f.args[0]) == 2],
                   "the flattened top-k gates (softmax of the top-k logits)", router)
    sorts = [n for n in region.nodes if n.target is aten.sort.default]
    order = _item(single(sorts, "sort of the chosen experts", router), 1, router)
    _token_rows(ctx, logits, hook_name(f"{prefix}.hook_router_logits", layer), bs, scope=router,
                hf_module=f"{router}.layer")
    _token_rows(ctx, indices, hook_name(f"{prefix}.hook_expert_indices", layer), bs, scope=router, hf_module=router)
    _token_rows(ctx, gates, hook_name(f"{prefix}.hook_routing_weights", layer), bs, scope=router, hf_module=router)
    return order


def _hook_slots(ctx, prefix: str, layer: int, module: str, experts: str, order: fx.Node, bs, top_k: int) -> None:
    """Replace HF's ``zeros.index_add(0, token, y_sorted)`` by per-slot rows [B,S,K,D] (hooked) summed over K."""
    graph = ctx.graph
    y_out = output_of(graph, experts, "the output experts' rows")
    weighted = single([u for u in y_out.users if u.target is aten.mul.Tensor], "the gate multiplication", module)
    add = single([u for u in weighted.users if u.target is aten.index_add.default and u.args[3] is weighted],
                 "index_add of the weighted expert rows", module)
    zeros, dim, token = add.args[0], add.args[1], add.args[2]
    if dim != 0 or zeros.target is not aten.zeros.default or not (token.target is aten.div.Tensor_mode
                                                                   and token.args[0] is order):
        raise NoMatch(module, "zeros(N, D).index_add(0, sorted // K, rows)", f"{add.name} reads {token.name}")
    b, s = bs
    width = add.meta["val"].shape[-1]
    meta = scoped_meta(add, module)
    with graph.inserting_before(add):
        n_rows = graph.call_function(aten.sym_size.int, (weighted, 0))
        empty = graph.call_function(aten.new_zeros.default, (weighted, [n_rows, width]))
        flat = graph.call_function(aten.index_copy.default, (empty, 0, order, weighted))
        slots = graph.call_function(aten.view.default, (flat, [b, s, top_k, width]))
        summed = graph.call_function(aten.sum.dim_IntList, (slots, [2]))
        out = graph.call_function(aten.view.default, (summed, [-1, width]))
    for n in (n_rows, empty, flat, slots, summed, out):
        n.meta.update(meta)
    add.replace_all_uses_with(out)
    graph.erase_node(add)
    if not zeros.users:
        graph.erase_node(zeros)
    hook_after(ctx, slots, hook_name(f"{prefix}.hook_expert_out", layer), scope=module, users=[summed],
               hf_module=experts)


def _query_heads(graph, experts: str, n_heads: int, d_head: int) -> fx.Node:
    """The query experts' output seen as [B,S,H,dh] (HF's own view after ungrouping: index_add -> views)."""
    q_rows = output_of(graph, f"{experts}.input_linear", "the query experts' rows")
    node = single([u for u in q_rows.users if u.target is aten.index_add.default], "index_add of the query rows",
                  experts)
    while True:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() == 4 and tuple(val.shape[-2:]) == (n_heads, d_head):
            return node
        views = [u for u in node.users if u.target in _VIEWS]
        if len(views) != 1:
            raise NoMatch(experts, f"the queries viewed as [B,S,{n_heads},{d_head}]", f"{node.name} is not")
        node = views[0]


def _kv_halves(graph, kv_path: str) -> list[fx.Node]:
    kv = output_of(graph, kv_path, "the key/value projection's output")
    chunk = single([u for u in kv.users if u.target is aten.chunk.default and tuple(u.args[1:]) == (2, -1)],
                   "chunk(kv, 2, dim=-1)", kv_path)
    return [_item(chunk, 0, kv_path), _item(chunk, 1, kv_path)]


def _unrepeated(node: fx.Node, top_k: int, where: str) -> fx.Node:
    """``x`` where ``node`` is ``x.repeat(1, K, 1, 1)`` (HF's repeat of k/v over the K query slots)."""
    if node.target is not aten.repeat.default or list(node.args[1]) != [1, top_k, 1, 1]:
        raise NoMatch(where, f"k/v repeated with repeat(1, {top_k}, 1, 1) before the attention call", node.name)
    return node.args[0]


@graph_pass(expects=lambda spec, dims, **_: PER_LAYER * dims["n_layers"])
def hook_jetmoe(ctx: PassContext, *, experts: str = "experts", kv: str = "kv_proj", router: str = "router",
                output_experts: str = "output_linear") -> int:
    """Hook JetMoE's attention experts and routers, its attention core and its MoE MLP (paths relative to the
    attention / MLP module)."""
    spec, graph, dims = ctx.spec, ctx.graph, ctx.dims
    calls = {}
    for call in AttentionCall.find(graph):
        calls.setdefault(_layer_of(call, spec.layers), []).append(call)
    top_k, n_heads, n_kv, d_head = dims["top_k"], dims["n_heads"], dims["n_kv_heads"], dims["d_head"]
    done = 0
    for i in range(dims["n_layers"]):
        attn, mlp = spec.layer(i, spec.attn), spec.mlp_path(i)
        call = single(calls.get(i, []), "attention call (fxbridge::attention)", attn)
        bs = token_dims(graph, first_tensor(ModuleRegion.of(graph, spec.layer(i)).nodes), ctx.dims["d_model"],
                        spec.layer(i))
        # attention router, query experts, k / v
        order = _hook_router(ctx, "attn", i, f"{attn}.{experts}.{router}", bs)
        q = _query_heads(graph, f"{attn}.{experts}", n_heads, d_head)
        hook_after(ctx, q, hook_name("attn.hook_q", i), scope=attn, hf_module=f"{attn}.{experts}.input_linear")
        for node, hook in zip(_kv_halves(graph, f"{attn}.{kv}"), ("attn.hook_k", "attn.hook_v")):
            to_hook, from_hook = heads_view(n_kv, d_head)
            hook_viewed(ctx, node, hook_name(hook, i), to_hook=to_hook, from_hook=from_hook, scope=attn,
                        hf_module=f"{attn}.{kv}")
        rot_k = _unrepeated(call.k, top_k, attn)
        _unrepeated(call.v, top_k, attn)
        # the attention core
        name = f"blocks.{i}.attn"
        core_module = AttentionCore(call.scaling, call.softcap, i)
        for point in core_module.children():
            point.made_by, point.hf_module = ctx.current_pass, attn
        install(ctx.root, name, core_module)
        with graph.inserting_before(call.node):
            core = call.with_layer(i).emit_core(graph, name)
        core.meta.update(call.node.meta)
        core.meta["fxbridge_pass"] = ctx.current_pass
        call.node.replace_all_uses_with(core)
        graph.erase_node(call.node)
        hook_viewed(ctx, call.q, hook_name("attn.hook_rot_q", i), to_hook=SWAP_HEADS_POS[0],
                    from_hook=SWAP_HEADS_POS[1], scope=attn, users=[core], hf_module=attn)
        hook_viewed(ctx, rot_k, hook_name("attn.hook_rot_k", i), to_hook=SWAP_HEADS_POS[0],
                    from_hook=SWAP_HEADS_POS[1], scope=attn, users=[call.k], hf_module=attn)
        hook_after(ctx, core, hook_name("attn.hook_z", i), scope=attn, hf_module=attn)
        _hook_slots(ctx, "attn", i, attn, f"{attn}.{experts}.{output_experts}", order, bs, top_k)
        # the MoE MLP
        order = _hook_router(ctx, "mlp", i, f"{mlp}.{router}", bs)
        _hook_slots(ctx, "mlp", i, mlp, f"{mlp}.{output_experts}", order, bs, top_k)
        done += 1
    return done
