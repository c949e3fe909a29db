"""Hook logits divided by a config constant after the unembedding (Granite's ``logits / config.logits_scaling``).

    u = hook_unembed(lm_head(x))                  u = hook_unembed(lm_head(x))          (unscaled, unchanged)
    y = div(u, c)                        ->       y = hook_logits(div(u, c))
Matched by use-def from ``hook_unembed`` (a ``div`` by c or a ``mul`` by 1/c), c checked against the config value
the spec names; the module still returns what HF returns, the scaled logits, now the output of ``hook_logits``.
"""
from __future__ import annotations

from ..runtime.names import hook_name
from .base import NoMatch, PassContext, graph_pass
from .graph_utils import hook_after
from .hook_final_softcap import _DIVS, _MULS, _close, _logits_source, _scalar


@graph_pass(expects=lambda spec, dims, config_attr: 1, requires=("hook_unembed",))
def hook_logit_scaling(ctx: PassContext, *, config_attr: str) -> int:
    """Hook ``hook_unembed / config.<config_attr>`` as ``hook_logits``."""
    want = float(getattr(ctx.config, config_attr))
    source = _logits_source(ctx.graph)
    found = []
    for user in source.users:
        div, mul = _scalar(user, source, _DIVS), _scalar(user, source, _MULS)
        c = div if div is not None else (1.0 / mul if mul else None)
        if c is not None:
            found.append((user, c))
    if len(found) != 1 or not _close(found[0][1], want):
        raise NoMatch(f"the logits after hook_unembed ({ctx.spec.unembed})",
                      f"one division by config.{config_attr}={want}", f"{[c for _, c in found]}")
    hook_after(ctx, found[0][0], hook_name("hook_logits"), scope="", hf_module=ctx.spec.unembed)
    return 1
