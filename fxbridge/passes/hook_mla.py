"""Hook multi-head latent attention (DeepSeek V2 / V3): the latents, the shared rope key, per-head q / k / v.

HF's MLA (``DeepseekV3Attention``; V2 the same with complex-number RoPE), with r_q / r_kv the LoRA ranks, dn / dr
the non-rotary / rotary parts of a q/k head (dqk = dn + dr) and dv the value head:

    cq = q_a_layernorm(q_a_proj(x)) ; q = q_b_proj(cq)            [B,S,H*dqk]  (no q LoRA: q = q_proj(x))
    q_nope, q_pe = split(q per head, [dn, dr]) ; ckv, k_pe = split(kv_a_proj_with_mqa(x), [r_kv, dr])
    ckv = kv_a_layernorm(ckv) ; q_pe, k_pe = rope(q_pe, k_pe)      k_pe: ONE rotary key [B,1,S,dr] for all heads
    k_nope, v = split(kv_b_proj(ckv) per head, [dn, dv])
    key = new_empty(B,H,S,dqk) ; key[..., :dn].copy_(k_nope) ; key[..., dn:].copy_(k_pe.expand(H))
    attention(cat(q_nope, q_pe), key, v)
->  cq = hook_q_latent(cq) ; ckv = hook_kv_latent(ckv) ; q = hook_q(q) [B,S,H,dqk] ; k_nope = hook_k(k_nope)
    [B,S,H,dn] ; v = hook_v(v) [B,S,H,dv] ; k_pe = hook_k_rope(rope(k_pe)) [B,S,1,dr] ;
    key = cat(k_nope, k_pe.expand(H))          (hook_attention then hooks rot_q / rot_k, what enters q.k^T, and z)

The key HF writes into an empty buffer with two in-place slice copies is rebuilt as the ``cat`` of the same two
values (identical numbers): a hook after the buffer would otherwise see it before the copies, and an edit of
``hook_rot_k`` could not reach the attention. Every per-head hook is a view (transpose of HF's [B,H,S,d]), so
in-place edits propagate. There is no pre-rotary per-head key in MLA: ``hook_k`` is the per-head part (no position
information), ``hook_k_rope`` the shared rotary part after RoPE (TransformerBridge's ``hook_rot_k``), and
``hook_rot_k`` the per-head key entering q.k^T (an edit of one head's slice reaches only that head).

Nodes are found by module (``ModuleRegion``) and use-def from the attention call: v is item 1 of the split of
``kv_b_proj``'s output, k_nope item 0 of the same split; the split sizes and the rotary key's width are checked
against the config.
"""
from __future__ import annotations

import operator

import torch

from ..runtime.names import hook_name
from ..tracer.attention_op import AttentionCall
from ..tracer.graph_facts import layer_index, scoped_meta
from .base import NoMatch, PassContext, graph_pass
from .graph_utils import SWAP_HEADS_POS, heads_view, hook_after, hook_viewed, output_of

aten = torch.ops.aten
_EMPTY = {aten.new_empty.default, aten.empty.memory_format, aten.new_zeros.default, aten.zeros.default}
# shape-only ops between a projection's output and its per-head split
_SHAPE_OPS = {aten.view.default, aten.reshape.default, aten.transpose.int, aten.permute.default,
              aten._unsafe_view.default, aten.alias.default, aten.contiguous.default, aten.clone.default}


def _expected(spec, dims, **_) -> int:
    return dims["n_layers"] * (5 + (1 if dims.get("q_lora_rank") else 0))


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _functional_key(ctx: PassContext, call: AttentionCall, where: str) -> None:
    """Rebuild a key written into an empty buffer by slice copies along the last dim as the cat of the copied
    values (in slice order); a key computed functionally is left alone."""
    graph, buf = ctx.graph, call.k
    if buf.op != "call_function" or buf.target not in _EMPTY:
        return
    width = _shape(buf)[-1]
    ndim = len(_shape(buf))
    pieces = []
    for user in buf.users:
        if user is call.node:
            continue
        copies = [u for u in user.users if u.target is aten.copy_.default and u.args[0] is user]
        if (user.target is not aten.slice.Tensor or user.args[1] not in (-1, ndim - 1) or len(user.args) > 4
                or len(copies) != 1 or len(user.users) != 1 or copies[0].users):
            raise NoMatch(where, "the key buffer written only by one copy_ into each slice of its last dim",
                          f"{user.name} ({user.target})")
        src = copies[0].args[1]
        if _shape(src) != _shape(user) or src.meta["val"].dtype != buf.meta["val"].dtype:
            raise NoMatch(where, "key pieces of the slice's shape and the buffer's dtype",
                          f"{src.name} {_shape(src)} into {_shape(user)}")
        start, end = user.args[2], user.args[3] if len(user.args) > 3 else None
        end = width if end is None or (isinstance(end, int) and end >= width) else end
        pieces.append((start, end, src, user, copies[0]))
    pieces.sort(key=lambda p: p[0])
    bounds = [(s, e) for s, e, *_ in pieces]
    if not pieces or bounds[0][0] != 0 or bounds[-1][1] != width or any(
            a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
        raise NoMatch(where, f"slice copies covering the key's last dim [0, {width}) once", f"slices {bounds}")
    with graph.inserting_before(call.node):
        key = graph.call_function(aten.cat.default, ([p[2] for p in pieces], -1))
    key.meta.update(scoped_meta(buf, None))
    key.meta["val"] = buf.meta["val"]
    call.node.replace_input_with(buf, key)
    for _, _, _, sl, cp in pieces:
        graph.erase_node(cp)
        graph.erase_node(sl)
    graph.erase_node(buf)


def _split_item(node, where: str, what: str):
    """(split node, index) where ``node`` is ``getitem(split_with_sizes(...), index)``."""
    if node.op == "call_function" and node.target is operator.getitem:
        src = node.args[0]
        if src.op == "call_function" and src.target in (aten.split_with_sizes.default, aten.split.Tensor):
            return src, node.args[1]
    raise NoMatch(where, f"{what}: an item of HF's split of a projection output", f"{node.name} ({node.target})")


def _item(split, index: int, where: str):
    items = [u for u in split.users if u.target is operator.getitem and u.args[1] == index]
    if len(items) != 1:
        raise NoMatch(where, f"one item {index} of {split.name}", f"{len(items)}")
    return items[0]


def _reaches(node, target, where: str) -> None:
    """``node`` is ``target`` seen through shape-only ops, else NoMatch."""
    seen = node
    while seen is not target:
        if seen.op != "call_function" or seen.target not in _SHAPE_OPS:
            raise NoMatch(where, f"the split to read {target.name} through views", f"{seen.name} ({seen.target})")
        seen = seen.args[0]


@graph_pass(expects=_expected, before=("hook_attention",))
def hook_mla(ctx: PassContext, *, q_a_norm: str = "q_a_layernorm", q_b: str = "q_b_proj", q_direct: str = "q_proj",
             kv_a_norm: str = "kv_a_layernorm", kv_b: str = "kv_b_proj") -> int:
    """Hook the latents, the shared rotary key and the per-head q / k / v of each MLA layer (module names relative
    to the attention module)."""
    spec, graph, dims = ctx.spec, ctx.graph, ctx.dims
    H, dn, dr, dv = dims["n_heads"], dims["d_nope"], dims["d_rope"], dims["d_head_v"]
    calls = {}
    for call in AttentionCall.find(graph):
        calls.setdefault(layer_index(call.node, spec.layers), []).append(call)
    found = 0
    for layer in range(dims["n_layers"]):
        attn = spec.layer(layer, spec.attn)
        if len(calls.get(layer, ())) != 1:
            raise NoMatch(attn, "one attention call (fxbridge::attention)", f"{len(calls.get(layer, ()))}")
        call = calls[layer][0]
        _functional_key(ctx, call, attn)
        call = AttentionCall.of(call.node)
        # v and k_nope: items 1 and 0 of the split of kv_b_proj's output, per head
        kv_b_out = output_of(graph, f"{attn}.{kv_b}", "the projection's output")
        split, index = _split_item(call.v, attn, "the attention's value")
        _reaches(split.args[0], kv_b_out, attn)
        if index != 1 or list(split.args[1]) != [dn, dv]:
            raise NoMatch(attn, f"v = item 1 of a split of {kv_b} into [{dn}, {dv}]",
                          f"item {index} of a split into {split.args[1]}")
        k_nope = _item(split, 0, attn)
        key = call.k
        if key.target is not aten.cat.default or len(key.args[0]) != 2 or key.args[0][0] is not k_nope:
            raise NoMatch(attn, f"the key = cat(k_nope from {kv_b}, the shared rotary key expanded to the heads)",
                          f"{key.name} ({key.target})")
        expand = key.args[0][1]
        rope_key = expand.args[0] if expand.target is aten.expand.default else None
        if rope_key is None or _shape(rope_key)[1] != 1 or _shape(rope_key)[-1] != dr:
            raise NoMatch(attn, f"the rotary part of the key: one [B,1,S,{dr}] key expanded to the heads",
                          f"{expand.name} ({expand.target}) {_shape(expand)}")
        # latents after their norms, q per head
        q_lora = dims.get("q_lora_rank")
        if q_lora:
            latent = output_of(graph, f"{attn}.{q_a_norm}", "the norm's output")
            hook_after(ctx, latent, hook_name("attn.hook_q_latent", layer), scope=attn, hf_module=f"{attn}.{q_a_norm}")
            found += 1
        q_path = f"{attn}.{q_b if q_lora else q_direct}"
        to_hook, from_hook = heads_view(H, dn + dr)
        hook_viewed(ctx, output_of(graph, q_path, "the projection's output"), hook_name("attn.hook_q", layer),
                    to_hook=to_hook, from_hook=from_hook, scope=attn, hf_module=q_path)
        kv_latent = output_of(graph, f"{attn}.{kv_a_norm}", "the norm's output")
        hook_after(ctx, kv_latent, hook_name("attn.hook_kv_latent", layer), scope=attn,
                   hf_module=f"{attn}.{kv_a_norm}")
        hook_viewed(ctx, rope_key, hook_name("attn.hook_k_rope", layer), to_hook=SWAP_HEADS_POS[0],
                    from_hook=SWAP_HEADS_POS[1], scope=attn, hf_module=attn)
        for node, name in ((k_nope, "attn.hook_k"), (call.v, "attn.hook_v")):
            hook_viewed(ctx, node, hook_name(name, layer), to_hook=SWAP_HEADS_POS[0], from_hook=SWAP_HEADS_POS[1],
                        scope=attn, hf_module=f"{attn}.{kv_b}")
        found += 5  # q, kv_latent, k_rope, k, v
    return found
