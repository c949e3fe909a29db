"""Hook the final-logit softcap: find ``cap * tanh(logits / cap)`` after ``hook_unembed`` and hook its output.

    u = hook_unembed(lm_head(x))                  u = hook_unembed(lm_head(x))          (pre-cap, unchanged)
    y = mul(tanh(div(u, c)), c)          ->       y = hook_logits(mul(tanh(div(u, c)), c))
The pattern is matched by use-def from ``hook_unembed`` (a ``div`` or a ``mul`` by 1/c, a ``tanh``, a ``mul`` by
c); both constants must equal the config value the spec names (``spec.final_softcap_config``). The module still
returns what HF returns: the post-cap logits, now the output of ``hook_logits``.
"""
from __future__ import annotations

import torch
from torch import fx

from ..runtime.names import hook_name
from .base import NoMatch, PassContext, graph_pass
from .graph_utils import hook_after

aten = torch.ops.aten
_DIVS = {aten.div.Tensor}
_MULS = {aten.mul.Tensor}
_TANHS = {aten.tanh.default}
# Ops that pass the logits through unchanged in value (dtype casts, views HF or export inserts).
_PASS_THROUGH = {aten.to.dtype, aten._to_copy.default, aten.alias.default, aten.type_as.default}


def _scalar(node: fx.Node, x: fx.Node, ops) -> float | None:
    """The Python scalar ``c`` when ``node`` is ``op(x, c)`` (or ``c * x`` for a mul), else None."""
    if node.op != "call_function" or node.target not in ops or len(node.args) != 2:
        return None
    a, b = node.args
    if a is x and isinstance(b, (int, float)):
        return float(b)
    if b is x and isinstance(a, (int, float)) and node.target in _MULS:
        return float(a)
    return None


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b), 1.0)


def match_softcap(x: fx.Node) -> tuple[fx.Node, float] | None:
    """``(output node, cap)`` when ``x`` feeds exactly ``cap * tanh(x / cap)``; None otherwise.

    ``x / c`` may be written ``x * (1/c)``; the outer multiplier must equal the inner divisor.
    """
    for scaled in x.users:
        cap = _scalar(scaled, x, _DIVS)
        if cap is None:
            inv = _scalar(scaled, x, _MULS)
            cap = 1.0 / inv if inv else None
        if cap is None or len(scaled.users) != 1:
            continue
        tanh = next(iter(scaled.users))
        if tanh.target not in _TANHS or len(tanh.users) != 1:
            continue
        out = next(iter(tanh.users))
        outer = _scalar(out, tanh, _MULS)
        if outer is not None and _close(outer, cap):
            return out, cap
    return None


def _logits_source(graph: fx.Graph) -> fx.Node:
    """The ``hook_unembed`` node, seen through value-preserving casts that follow it."""
    node = next(iter(graph.find_nodes(op="call_module", target="hook_unembed")), None)
    if node is None:
        raise NoMatch("the graph", "the hook_unembed node (the hook_unembed pass runs first)", "none")
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.target not in _PASS_THROUGH or user.args[0] is not node:
            break
        node = user
    return node


@graph_pass(expects=lambda spec, dims: int(spec.final_softcap_config is not None), requires=("hook_unembed",))
def hook_final_softcap(ctx: PassContext) -> int:
    """Hook the post-softcap logits (``hook_logits``); ``hook_unembed`` stays the pre-cap logits."""
    attr = ctx.spec.final_softcap_config
    where = f"the logits after hook_unembed ({ctx.spec.unembed})"
    found = match_softcap(_logits_source(ctx.graph))
    if found is None:
        if attr is None:
            return 0
        raise NoMatch(where, f"cap * tanh(x / cap), cap = config.{attr}", "no such expression")
    out, cap = found
    want = getattr(ctx.config, attr, None) if attr else None
    if want is None or not _close(cap, float(want)):
        raise NoMatch(where, f"the cap config.{attr}={want}", f"cap {cap} in the graph")
    hook_after(ctx, out, hook_name("hook_logits"), scope="", hf_module=ctx.spec.unembed)
    return 1
