"""Recognise attention that HF computes inline (Falcon) and replace it by one ``fxbridge::attention`` node.

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
_SAME_VALUE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
               aten.contiguous.default, aten.alias.default}
_DTYPE = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}
_DROPOUT = {aten.dropout.default}
_ADD = {aten.add.Tensor, aten.add_.Tensor}
_MUL = {aten.mul.Tensor, aten.mul_.Tensor}
_DIV = {aten.div.Tensor, aten.div_.Tensor}


def _shape(node: fx.Node):
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = _shape(a), _shape(b)
    return sa is not None and len(sa) == len(sb) and all(str(x) == str(y) for x, y in zip(sa, sb))


def _is_k_transpose(node) -> bool:
    if not isinstance(node, fx.Node) or node.target != aten.transpose.int:
        return False
    dims = sorted(d % 4 for d in node.args[1:3])
    return dims == [2, 3]


class _Scores:
    """scores = coef * (q @ k^T) + sum(c_i * term_i), parsed from HF's expression."""

    def __init__(self, qk: fx.Node):
        self.qk, self.coef, self.terms = qk, 1.0, []  # terms: [tensor node, coefficient]

    def scaled(self, factor: float) -> "_Scores":
        self.coef *= factor
        self.terms = [[t, c * factor] for t, c in self.terms]
        return self


def parse_scores(node: fx.Node, where: str) -> _Scores:
    """Parse the softmax input into q.k^T times a scale plus additive terms; NoMatch when it is not that."""
    if node.target in _MATMUL and _is_k_transpose(node.args[1]):
        return _Scores(node)
    if node.target in _DTYPE or node.target in _SAME_VALUE and _same_shape(node, node.args[0]):
        return parse_scores(node.args[0], where)
    if node.target in _ADD and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
        for mine, other in (node.args, node.args[::-1]):
            try:
                parsed = parse_scores(mine, where)
            except NoMatch:
                continue
            parsed.terms.append([other, 1.0])
            return parsed
    if node.target in _MUL | _DIV and isinstance(node.args[1], (int, float)):
        factor = float(node.args[1])
        return parse_scores(node.args[0], where).scaled(factor if node.target in _MUL else 1.0 / factor)
    raise NoMatch(where, "scores q @ k^T times a scale plus additive terms",
                  f"{node.name} ({node.target}), none of these")


def _pattern_times_v(softmax: fx.Node, where: str) -> fx.Node:
    """The matmul(pattern, v) the softmax feeds, through dropout (eval: identity) and same-shape views."""
    x = softmax
    while True:
        user = single(list(x.users), f"user of the attention pattern {x.name}", where)
        if user.target in _MATMUL and user.args[0] is x:
            return user
        if user.target in _DROPOUT or user.target in _DTYPE or user.target in _SAME_VALUE and _same_shape(user, x):
            x = user
            continue
        raise NoMatch(where, "the attention pattern flowing into pattern @ v", f"it flows into {user.name} "
                      f"({user.target})")


def _unrepeat(graph, x: fx.Node, n_kv: int, n_heads: int) -> fx.Node:
    """[B,H,S,d] that repeats each KV head R times (group-major) -> [B,Hkv,S,d], a view of the first copy."""
    shape = _shape(x)
    if shape is None or shape[1] != n_heads or n_kv == n_heads:
        return x
    grouped = graph.call_function(aten.unflatten.int, (x, 1, [n_kv, n_heads // n_kv]))
    return graph.call_function(aten.select.int, (grouped, 2, 0))


def _scaled_term(graph, term: fx.Node, coef: float) -> fx.Node:
    return term if coef == 1.0 else graph.call_function(aten.mul.Tensor, (term, coef))


def capture_layer(ctx: PassContext, layer: int, drop_pre_scale_bias: bool) -> None:
    """Find one layer's softmax, parse its scores and pattern @ v, and put the attention node in their place."""
    spec, dims, graph = ctx.spec, ctx.dims, ctx.graph
    attn_path = spec.layer(layer, spec.attn)
    nodes = ModuleRegion.of(graph, attn_path).nodes
    softmax = single([n for n in nodes if n.target in _SOFTMAX], "softmax", attn_path)
    if softmax.args[1] not in (-1, 3):
        raise NoMatch(attn_path, "a softmax over the key dim (-1)", f"a softmax over dim {softmax.args[1]}")
    scores = parse_scores(softmax.args[0], attn_path)
    pv = _pattern_times_v(softmax, attn_path)
    q, k, v = scores.qk.args[0], scores.qk.args[1].args[0], pv.args[1]
    terms = scores.terms
    if drop_pre_scale_bias:  # HF's configured branch adds only the (bias-folded) mask
        dropped = [t for t, c in terms if c != 1.0]
        terms = [[t, c] for t, c in terms if c == 1.0]
        log.debug("%s: dropping pre-scale bias terms %s (folded into the mask by HF)", attn_path, dropped)
    before = set(graph.nodes)
    with graph.inserting_before(pv):
        k_in, v_in = (_unrepeat(graph, x, dims["n_kv_heads"], dims["n_heads"]) for x in (k, v))
        mask = None
        for term, coef in terms:
            term = _scaled_term(graph, term, coef)
            mask = term if mask is None else graph.call_function(aten.add.Tensor, (mask, term))
        op = AttentionCall(q, k_in, v_in, mask, float(scores.coef), None, layer).emit(graph)
        out = graph.call_function(aten.transpose.int, (op, 1, 2))
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
