"""Recognise attention that HF computes inline (Falcon, GPT-Neo, XGLM, OpenAI GPT, Bloom, MPT) and replace it by
one ``fxbridge::attention`` node.

Models that call attention through HF's AttentionInterface already hold one such node per layer (see
tracer/attention_op.py); Falcon writes it out. This pass finds, by structure inside each attention module,

    s = matmul(q, transpose(k)) [view] [+ bias] (* | /) scale [+ bias] ;  p = softmax(s + mask) [dropout] [view]
    o = matmul(p, v)
->  o = transpose(fxbridge.attention(q, k, v, mask', scale), 1, 2)          (mask' = every additive term, scaled)

so ``hook_attention`` then installs the AttentionCore (fused SDPA unless scores/pattern are hooked) and the
rot_q / rot_k / z hooks exactly as for the other families. K/V that HF already repeated to H heads are
given to the core un-repeated (one view: head h of the repeat is KV head h // R), so ``hook_rot_k`` is
[B,S,Hkv,dh]. Additive terms are parsed with their coefficients: an ALiBi bias that HF adds before the
scale enters ``hook_attn_scores`` scaled, as HF has it. Falcon's eager ALiBi branch adds ALiBi twice (once
here, once folded into the mask by FalconModel) while its sdpa branch -- the default -- adds it once; the
pass's ``drop_pre_scale_bias`` says which branch the model is configured for (see architectures/falcon.py).

The scores may also be ``baddbmm(bias, q, kᵀ, beta, alpha)`` (Bloom: bias * beta is a term, alpha the scale), be
computed on heads flattened into the batch ([B*H,S,dh] operands, Bloom / XGLM: operands, terms and the output are
viewed between the two layouts), skip the scale (GPT-Neo: 1.0), and carry masks written into them:
``where(keep, s, fill)`` and ``masked_fill(s, drop, fill)`` become the term ``where(keep, 0, fill)``, a product with
a 0/1 tensor ``s * keep`` the term ``where(keep, 0, -inf)`` (OpenAI GPT's ``s * b - 1e4 * (1 - b)``: masked entries
are -inf, the softmax is HF's), and a floor ``max(s, finfo.min)`` (XGLM) is dropped (it changes only -inf).
"""
from __future__ import annotations

import logging
import operator

import torch
from torch import fx

from ..tracer.attention_op import AttentionCall
from ..tracer.graph_facts import ModuleRegion, scoped_meta
from .base import NoMatch, PassContext, graph_pass
from .graph_utils import single

log = logging.getLogger(__name__)
aten = torch.ops.aten

_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_MATMUL = {aten.matmul.default, aten.bmm.default}
_BADDBMM = {aten.baddbmm.default}
_SAME_VALUE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
               aten.contiguous.default, aten.alias.default}
_DTYPE = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}
_DROPOUT = {aten.dropout.default}
_ADD = {aten.add.Tensor, aten.add_.Tensor}
_MUL = {aten.mul.Tensor, aten.mul_.Tensor}
_DIV = {aten.div.Tensor, aten.div_.Tensor}
_FLOOR = {aten.max.other, aten.maximum.default}  # max(scores, tensor(finfo.min)): no finite score changes
_WHERE = {aten.where.self}  # where(keep, scores, fill)
_MASKED_FILL = {aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.masked_fill_.Scalar,
                aten.masked_fill_.Tensor}  # masked_fill(scores, drop, fill)


def _shape(node: fx.Node):
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _dtype(node: fx.Node):
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else None


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = _shape(a), _shape(b)
    return sa is not None and sb is not None and len(sa) == len(sb) and all(str(x) == str(y) for x, y in zip(sa, sb))


def _is_k_transpose(node) -> bool:
    """``k.transpose`` of the last two dims (of a [B,H,S,d] or [B*H,S,d] key)."""
    if not isinstance(node, fx.Node) or node.target != aten.transpose.int or _shape(node) is None:
        return False
    rank = len(_shape(node))
    return sorted(d % rank for d in node.args[1:3]) == [rank - 2, rank - 1]


class _Scores:
    """scores = coef * (q @ kᵀ) + sum(c_i * term_i), parsed from HF's expression.

    ``kt`` is the right operand of the product (the keys, transposed); terms parsed below a view from
    flattened [B*H,Sq,Sk] scores (Bloom, XGLM) are marked ``flat`` and unflattened when the mask is built.
    """

    def __init__(self, qk: fx.Node, q: fx.Node, kt: fx.Node):
        self.qk, self.q, self.kt, self.coef, self.terms = qk, q, kt, 1.0, []  # terms: [node, coefficient, flat]

    def scaled(self, factor: float) -> "_Scores":
        self.coef *= factor
        self.terms = [[t, c * factor, f] for t, c, f in self.terms]
        return self


def _scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_scores(node: fx.Node, where: str) -> _Scores:
    """Parse the softmax input into q.kᵀ times a scale plus additive terms; NoMatch when it is not that.

    Additive terms are tensors added to the scores, ``baddbmm``'s input (times beta), and masks written as
    ``where(keep, s, fill)`` / ``masked_fill(s, drop, fill)`` (read as ``s + where(keep, 0, fill)``) or as a
    product with a 0/1 tensor (``s * keep``, read as ``s + where(keep, 0, -inf)``).
    """
    if node.target in _MATMUL:
        return _Scores(node, node.args[0], node.args[1])
    if node.target in _BADDBMM:  # beta * input + alpha * (batch1 @ batch2)
        beta, alpha = node.kwargs.get("beta", 1.0), node.kwargs.get("alpha", 1.0)
        parsed = _Scores(node, node.args[1], node.args[2]).scaled(float(alpha))
        parsed.terms.append([node.args[0], float(beta), _flat(node)])
        return parsed
    if node.target in _DTYPE or node.target in _SAME_VALUE and _same_shape(node, node.args[0]):
        return parse_scores(node.args[0], where)
    if node.target in _FLOOR and _shape(node.args[1]) == ():  # max(s, finfo.min) (XGLM): bites only on -inf
        return parse_scores(node.args[0], where)
    if node.target in _SAME_VALUE and _heads_view(node.args[0], node):  # [B*H,Sq,Sk] <-> [B,H,Sq,Sk]
        return parse_scores(node.args[0], where)
    if node.target in _ADD and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
        for mine, other in (node.args, node.args[::-1]):
            try:
                parsed = parse_scores(mine, where)
            except NoMatch:
                continue
            parsed.terms.append([other, 1.0, _flat(node)])
            return parsed
    if node.target in _MUL | _DIV and _scalar(node.args[1]):
        factor = float(node.args[1])
        return parse_scores(node.args[0], where).scaled(factor if node.target in _MUL else 1.0 / factor)
    if node.target in _MUL and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
        for mine, other in (node.args, node.args[::-1]):  # s * keep, keep a 0/1 mask (OpenAI GPT's causal bias)
            if _dtype(other) is not None and _shape(other) is not None and _broadcasts_into(other, node):
                try:
                    parsed = parse_scores(mine, where)
                except NoMatch:
                    continue
                parsed.terms.append([("keep", other, float("-inf")), 1.0, _flat(node)])
                return parsed
    if node.target in _WHERE and isinstance(node.args[1], fx.Node):
        parsed = parse_scores(node.args[1], where)
        parsed.terms.append([("keep", node.args[0], node.args[2]), 1.0, _flat(node)])
        return parsed
    if node.target in _MASKED_FILL:
        parsed = parse_scores(node.args[0], where)
        parsed.terms.append([("drop", node.args[1], node.args[2]), 1.0, _flat(node)])
        return parsed
    raise NoMatch(where, "scores q @ k^T times a scale plus additive terms",
                  f"{node.name} ({node.target}), none of these")


def _broadcasts_into(small: fx.Node, big: fx.Node) -> bool:
    a, b = _shape(small), _shape(big)
    return a is not None and b is not None and len(a) == len(b) and all(str(x) in ("1", str(y)) for x, y in zip(a, b))


def _heads_view(a: fx.Node, b: fx.Node) -> bool:
    """Whether one of ``a``, ``b`` is the [B*H,Sq,Sk] view of the other, [B,H,Sq,Sk]."""
    sa, sb = _shape(a), _shape(b)
    if sa is None or sb is None or {len(sa), len(sb)} != {3, 4}:
        return False
    flat, full = (sa, sb) if len(sa) == 3 else (sb, sa)
    return [str(x) for x in flat[1:]] == [str(x) for x in full[2:]]


def _flat(node: fx.Node) -> bool:
    """Whether scores ``node`` are [B*H,Sq,Sk] (a term added there is unflattened when the mask is built)."""
    return len(_shape(node) or ()) == 3


def _pattern_times_v(softmax: fx.Node, where: str) -> fx.Node:
    """The matmul(pattern, v) the softmax feeds, through dropout (eval: identity), casts and views."""
    x = softmax
    while True:
        user = single(list(x.users), f"user of the attention pattern {x.name}", where)
        if user.target in _MATMUL and user.args[0] is x:
            return user
        if user.target in _DROPOUT or user.target in _DTYPE or user.target in _SAME_VALUE:
            x = user
            continue
        raise NoMatch(where, "the attention pattern flowing into pattern @ v", f"it flows into {user.name} "
                      f"({user.target})")


def _heads(graph, x: fx.Node, n_heads: int) -> fx.Node:
    """[B,H,S,d] for an attention operand: itself, the [B,H,S,d] tensor HF flattened to [B*H,S,d], or that
    flattening undone by a view."""
    shape = _shape(x)
    if shape is None or len(shape) != 3:
        return x
    src = x.args[0] if x.target in _SAME_VALUE else None
    src_shape = _shape(src) if isinstance(src, fx.Node) else None
    if src_shape is not None and len(src_shape) == 4 and [str(d) for d in src_shape[2:]] == [str(d) for d in shape[1:]]:
        return src
    return graph.call_function(aten.unflatten.int, (x, 0, [-1, n_heads]))


def _keys(graph, kt: fx.Node) -> fx.Node:
    """k from the product's right operand kᵀ: the transposed tensor itself, else a transposing view."""
    if _is_k_transpose(kt):
        return kt.args[0]
    return graph.call_function(aten.transpose.int, (kt, -2, -1))


def _unrepeat(graph, x: fx.Node, n_kv: int, n_heads: int) -> fx.Node:
    """[B,H,S,d] that repeats each KV head R times (group-major) -> [B,Hkv,S,d], a view of the first copy."""
    shape = _shape(x)
    if shape is None or shape[1] != n_heads or n_kv == n_heads:
        return x
    grouped = graph.call_function(aten.unflatten.int, (x, 1, [n_kv, n_heads // n_kv]))
    return graph.call_function(aten.select.int, (grouped, 2, 0))


def _term(graph, term, coef: float, flat: bool, n_heads: int, dtype) -> fx.Node:
    """One additive term as a node: a tensor times its coefficient, or a mask read as 0 / fill."""
    if isinstance(term, tuple):  # ("keep" | "drop", mask, fill): 0 where kept, fill where dropped
        kind, mask, fill = term
        lead = _shape(mask)
        if kind == "keep":
            mask = graph.call_function(aten.eq.Scalar, (mask, 0))
        zeros = graph.call_function(aten.zeros_like.default, (mask,), {"dtype": dtype})
        fill_op = aten.masked_fill.Tensor if isinstance(fill, fx.Node) else aten.masked_fill.Scalar
        term = graph.call_function(fill_op, (zeros, mask, fill))
    else:
        lead = _shape(term)
        if coef != 1.0:
            term = graph.call_function(aten.mul.Tensor, (term, coef))
    if flat:  # a [B*H,..] (or [1,..]) term of the flattened scores -> [B,H,..] (or [1,1,..])
        if lead is not None and str(lead[0]) == "1":
            return graph.call_function(aten.unsqueeze.default, (term, 0))
        return graph.call_function(aten.unflatten.int, (term, 0, [-1, n_heads]))
    return term


def capture_layer(ctx: PassContext, layer: int, drop_pre_scale_bias: bool) -> None:
    """Find one layer's softmax, parse its scores and pattern @ v, and put the attention node in their place."""
    spec, dims, graph = ctx.spec, ctx.dims, ctx.graph
    attn_path = spec.layer(layer, spec.attn)
    nodes = ModuleRegion.of(graph, attn_path).nodes
    softmax = single([n for n in nodes if n.target in _SOFTMAX], "softmax", attn_path)
    if softmax.args[1] not in (-1, len(_shape(softmax) or (0,) * 4) - 1):
        raise NoMatch(attn_path, "a softmax over the key dim (-1)", f"a softmax over dim {softmax.args[1]}")
    scores = parse_scores(softmax.args[0], attn_path)
    pv = _pattern_times_v(softmax, attn_path)
    terms = scores.terms
    if drop_pre_scale_bias:  # HF's configured branch adds only the (bias-folded) mask
        dropped = [t for t, c, _ in terms if c != 1.0]
        terms = [t for t in terms if t[1] == 1.0]
        log.debug("%s: dropping pre-scale bias terms %s (folded into the mask by HF)", attn_path, dropped)
    before = set(graph.nodes)
    n_heads = dims["n_heads"]
    with graph.inserting_before(pv):
        q = _heads(graph, scores.q, n_heads)
        k = _heads(graph, _keys(graph, scores.kt), n_heads)
        v = _heads(graph, pv.args[1], n_heads)
        k_in, v_in = (_unrepeat(graph, x, dims["n_kv_heads"], n_heads) for x in (k, v))
        mask = None
        for term, coef, flat in terms:
            term = _term(graph, term, coef, flat, n_heads, _dtype(scores.qk))
            mask = term if mask is None else graph.call_function(aten.add.Tensor, (mask, term))
        op = AttentionCall(q, k_in, v_in, mask, float(scores.coef), None, layer).emit(graph)
        out = graph.call_function(aten.transpose.int, (op, 1, 2))
        if len(_shape(pv)) == 3:  # HF multiplied [B*H,S,S] @ [B*H,S,d]
            out = graph.call_function(aten.flatten.using_ints, (out, 0, 1))
    for n in set(graph.nodes) - before:
        n.meta.update(scoped_meta(softmax, None))
        n.meta["fxbridge_pass"] = "capture_eager_attention"
    pv.replace_all_uses_with(out)
    _erase_unused(graph, [pv, softmax, scores.qk])


def _erase_unused(graph, roots) -> None:
    """Erase ``roots`` and, transitively, the inputs that only they read (the old scores/pattern chain)."""
    todo = list(roots)
    while todo:
        node = todo.pop()
        if node._erased or node.users or node.op != "call_function":
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        todo.extend(n for n in inputs if n.op == "call_function" and n.target not in (operator.getitem,))


@graph_pass(expects=lambda spec, dims, **_: dims["n_layers"], before=("hook_attention",))
def capture_eager_attention(ctx: PassContext, *, drop_pre_scale_bias: bool = False) -> int:
    """Replace inline (eager) attention by an fxbridge.attention node, one per layer.

    ``drop_pre_scale_bias``: HF's configured attention branch adds only the mask (Falcon sdpa: ALiBi is folded into
    the mask), so additive terms the eager expression adds before the scale are left out.
    """
    for layer in range(ctx.dims["n_layers"]):
        capture_layer(ctx, layer, drop_pre_scale_bias)
    return ctx.dims["n_layers"]
