"""``trace(model, verify=True)`` / ``verify(gm)``: check the traced module against the HF model, layer by layer.

One random batch goes through both. The HF decoder layers' outputs are captured with forward hooks on the HF
model, registered for that one call and removed after it (also on error); the traced module's
``blocks.{i}.hook_resid_post`` are cached. The first layer whose difference exceeds the tolerance -- or the
logits, if every layer agrees -- is named in a ``VerificationError`` with the figures.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from .errors import UsageError, VerificationError
from .runtime.names import hook_name

log = logging.getLogger(__name__)

# max |traced - HF| allowed, relative to (1 + max |HF|): fp32 differences are rounding (eager vs fused attention)
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def verify(gm, model: torch.nn.Module | None = None, *, batch: int = 2, seq: int = 7, seed: int = 0,
           tolerance: float | None = None) -> dict[str, float]:
    """Compare ``gm`` with ``model`` (default: the HF model it wraps) on random tokens.

    Returns ``{point: max abs difference}`` for every decoder layer's output and the logits; raises
    ``VerificationError`` naming the first point whose difference exceeds the tolerance.
    """
    model = gm.hf if model is None else model
    param = next(iter(model.parameters()), None)
    if param is not None and param.device.type == "meta":
        raise UsageError("verify needs real weights; this model is on the meta device (nothing to compare)")
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    tol = TOLERANCE.get(dtype, 1e-4) if tolerance is None else tolerance
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(gm.dims["d_vocab"]), (batch, seq), generator=gen).to(device)
    mask = torch.ones_like(ids)

    with _reference_attention(model):
        hf_out = _hf_layer_outputs(model, gm.spec.layers, ids, mask)
    names = [hook_name("hook_resid_post", i) for i in range(len(hf_out["layers"]))]
    names = [n for n in names if n in gm.hook_dict]
    with torch.no_grad():
        logits, cache = gm.run_with_cache(ids, attention_mask=mask, names_filter=names)

    diffs: dict[str, float] = {}
    checks = [(name, f"HF {gm.spec.layers}.{i} output", cache[name], hf_out["layers"][i])
              for i, name in enumerate(names)]
    checks.append(("logits", "HF logits", logits, hf_out["logits"]))
    for name, what, ours, ref in checks:
        ref = ref.to(ours.device)
        diff = (ours.float() - ref.float()).abs().max().item() if ours.shape == ref.shape else float("inf")
        diffs[name] = diff
        bound = tol * (1.0 + ref.float().abs().max().item())
        if not diff <= bound:  # also catches NaN
            shape = "" if ours.shape == ref.shape else f"shape {tuple(ours.shape)} vs {tuple(ref.shape)}; "
            details = [f"{shape}earlier points agree: " +
                       (", ".join(f"{k} {v:.1e}" for k, v in diffs.items() if k != name) or "none")]
            raise VerificationError(f"{name} (vs {what})", diff, bound, details)
    log.info("verify: %d points agree, max diff %.2e", len(diffs), max(diffs.values()))
    return diffs


@contextlib.contextmanager
def _reference_attention(model):
    """Run HF with eager attention where its configured kernel silently drops a feature of the model.

    transformers releases before 5.2x default Gemma 2 to sdpa, whose kernel ignores ``attn_logit_softcapping``
    (later releases refuse sdpa for it); the model's attention -- HF eager, and fxbridge's trace -- applies the cap.
    The switch is undone afterwards.
    """
    config = model.config
    switch = getattr(config, "attn_logit_softcapping", None) is not None and config._attn_implementation == "sdpa"
    if not switch:
        yield
        return
    log.warning("verify: %s runs sdpa, which ignores attn_logit_softcapping; comparing with HF eager attention",
                type(model).__name__)
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


def _hf_layer_outputs(model, layers_path: str, ids, mask) -> dict:
    layers = model.get_submodule(layers_path)
    outputs: list = [None] * len(layers)

    def saver(i):
        def save(module, args, out):
            out = out[0] if isinstance(out, (tuple, list)) else out
            outputs[i] = out.detach()
        return save

    handles = [layer.register_forward_hook(saver(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return {"layers": outputs, "logits": logits}
