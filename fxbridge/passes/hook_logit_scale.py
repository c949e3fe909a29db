"""Hook the logits after a constant the model scales them by: ``hook_logits``.

Cohere multiplies the lm_head output by ``config.logit_scale``; Granite divides it by ``config.logits_scaling``
(``divide=True``; HF may also write that as a multiply by 1/c):

    u = hook_unembed(lm_head(x))                  u = hook_unembed(lm_head(x))          (the lm_head output)
    y = mul(u, c)   |   y = div(u, c)     ->      y = hook_logits(y)
The scaling is matched by use-def from ``hook_unembed`` (seen through value-preserving casts) and ``c`` must equal
the config value named by ``config_attr``. The module still returns what HF returns: the scaled logits, now the
output of ``hook_logits`` (as the post-softcap logits of ``hook_final_softcap``).
"""
from __future__ import annotations

from ..runtime.names import hook_name
from .base import NoMatch, PassContext, graph_pass
from .graph_utils import hook_after
from .hook_final_softcap import _DIVS, _MULS, _close, _logits_source, _scalar


def _factor(user, source, divide: bool) -> float | None:
    """The constant ``user`` scales ``source`` by, as a multiplier (``divide``: as a divisor)."""
    mul, div = _scalar(user, source, _MULS), _scalar(user, source, _DIVS)
    factor = mul if mul is not None else (1.0 / div if div else None)
    if factor is None or not divide:
        return factor
    return 1.0 / factor if factor else None


@graph_pass(expects=lambda spec, dims, **_: 1, requires=("hook_unembed",))
def hook_logit_scale(ctx: PassContext, *, config_attr: str = "logit_scale", divide: bool = False) -> int:
    """Hook the logits scaled by ``config.<config_attr>`` (divided by it with ``divide``) as ``hook_logits``;
    ``hook_unembed`` stays unscaled."""
    want = float(getattr(ctx.config, config_attr))
    source = _logits_source(ctx.graph)
    found = [(u, c) for u in source.users if (c := _factor(u, source, divide)) is not None]
    if len(found) != 1 or not _close(found[0][1], want):
        verb = "division by" if divide else "multiply by"
        raise NoMatch(f"the logits after hook_unembed ({ctx.spec.unembed})",
                      f"one {verb} config.{config_attr}={want}",
                      f"{verb} {[c for _, c in found]}" if found else "no scaling by a constant")
    hook_after(ctx, found[0][0], hook_name("hook_logits"), scope="", hf_module=ctx.spec.unembed)
    return 1
