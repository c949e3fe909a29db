"""Hook the logits after a constant logit multiplier (Cohere's ``logit_scale``): ``hook_logits``.

    u = hook_unembed(lm_head(x))                  u = hook_unembed(lm_head(x))          (the lm_head output)
    y = mul(u, c)                        ->       y = hook_logits(mul(u, c))
The multiply is matched by use-def from ``hook_unembed`` (seen through value-preserving casts) and ``c`` must equal
the config value named by ``config_attr``. The module still returns what HF returns: the scaled logits, now the
output of ``hook_logits`` (as the post-softcap logits of ``hook_final_softcap``).
"""
from __future__ import annotations

from ..runtime.names import hook_name
from .base import NoMatch, PassContext, graph_pass
from .graph_utils import hook_after
from .hook_final_softcap import _MULS, _close, _logits_source, _scalar


@graph_pass(expects=lambda spec, dims, **_: 1, requires=("hook_unembed",))
def hook_logit_scale(ctx: PassContext, *, config_attr: str = "logit_scale") -> int:
    """Hook the logits scaled by ``config.<config_attr>`` (``hook_logits``); ``hook_unembed`` stays unscaled."""
    want = float(getattr(ctx.config, config_attr))
    source = _logits_source(ctx.graph)
    where = f"the logits after hook_unembed ({ctx.spec.unembed})"
    found = [(u, c) for u in source.users if (c := _scalar(u, source, _MULS)) is not None]
    if len(found) != 1 or not _close(found[0][1], want):
        raise NoMatch(where, f"one multiply by config.{config_attr}={want}",
                      f"multiplies by {[c for _, c in found]}" if found else "no multiply by a constant")
    hook_after(ctx, found[0][0], hook_name("hook_logits"), scope="", hf_module=ctx.spec.unembed)
    return 1
