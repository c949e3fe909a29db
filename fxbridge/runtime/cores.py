"""Regions that HF computes fused and TransformerLens hooks in the middle of.

A core replaces a small piece of the captured graph (the attention call, a norm's normalisation) with one
``call_module`` node. Its hook points are its children. While none of them has a hook attached, the core runs
the same fused op HF runs (``scaled_dot_product_attention``, ``x * rsqrt(v)``, ``layer_norm``); once one is hooked
it computes the intermediate values explicitly, exactly as HF's eager code does, so hooks see the real values and
their edits take effect (DESIGN.md principle 4: pay only for what is hooked).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .attention import eager_attention, fused_attention
from .hook_point import FastCallModule, HookPoint


class AttentionCore(FastCallModule):
    """softmax(q k^T * scale [-> softcap] + mask) v for one layer; q [B,H,S,dh], k/v [B,Hkv,S,dh] -> z [B,S,H,dh].

    With ``sinks`` (gpt_oss: a learned logit per head, passed as a fifth input [H]) the softmax runs over the real
    keys and the sink, and the sink's column is dropped: ``hook_attn_scores`` holds the real keys only,
    ``hook_sink_logits`` [H] the sinks, ``hook_pattern`` the probabilities of the real keys (rows sum < 1). Such a
    layer always runs the eager math (SDPA has no sink; HF's gpt_oss has no sdpa path either).

    ``force_eager`` makes it always materialise scores and pattern (useful to compare the two paths).
    """

    # KV-cached decoding (runtime/decode.py): the positional inputs with a key-position dim 2, and the mask's
    KV_INPUTS, MASK_INPUT = (1, 2), 3

    def __init__(self, scaling: float, softcap: float | None, layer: int, sinks: bool = False):
        super().__init__()
        self.scaling, self.softcap, self.layer, self.sinks = float(scaling), softcap, layer, bool(sinks)
        self.force_eager = False
        if softcap is not None:  # children in firing order: hook_dict lists a core's points in this order
            self.hook_attn_scores_pre_cap = HookPoint()
        self.hook_attn_scores = HookPoint()
        if self.sinks:
            self.hook_sink_logits = HookPoint()
        self.hook_pattern = HookPoint()

    def needs_eager(self) -> bool:
        """True when this layer must materialise scores/pattern (a hook on them, softcap, or forced)."""
        return (self.force_eager or self.softcap is not None or self.sinks
                or self.hook_attn_scores.has_hooks or self.hook_pattern.has_hooks)

    def forward(self, q, k, v, mask, sinks=None):
        if self.sinks != (sinks is not None):
            raise TypeError(f"attention core of layer {self.layer} was built {'with' if self.sinks else 'without'} "
                            f"sinks but called {'without' if sinks is None else 'with'} them")
        if not self.needs_eager():
            return fused_attention(q, k, v, mask, self.scaling)
        pre_cap = getattr(self, "hook_attn_scores_pre_cap", None)
        sinks_hook = getattr(self, "hook_sink_logits", None)
        return eager_attention(
            q, k, v, mask, self.scaling, self.softcap,
            scores_hook=self.hook_attn_scores,
            pre_cap_hook=pre_cap if pre_cap is not None and pre_cap.has_hooks else None,
            pattern_hook=self.hook_pattern,
            sinks=sinks, sinks_hook=sinks_hook if sinks_hook is not None and sinks_hook.has_hooks else None,
        )

    def fake_values(self, q, k, v, mask, sinks=None):
        """(output, {child: value it sees}) on fake inputs, from shapes and dtypes alone (the graph's metadata)."""
        batch, heads, q_len, _ = q.shape
        scores_dtype = torch.promote_types(q.dtype, k.dtype)
        if mask is not None:
            scores_dtype = torch.promote_types(scores_dtype, mask.dtype)
        scores = q.new_empty((batch, heads, q_len, k.shape[2]), dtype=scores_dtype)
        inner = {name: scores for name in ("hook_attn_scores_pre_cap", "hook_attn_scores") if hasattr(self, name)}
        if sinks is not None:
            inner["hook_sink_logits"] = sinks.new_empty(sinks.shape)
            inner["hook_pattern"] = q.new_empty(scores.shape, dtype=v.dtype)
        else:
            inner["hook_pattern"] = q.new_empty(scores.shape, dtype=q.dtype)
        return q.new_empty((batch, q_len, heads, v.shape[-1]), dtype=torch.promote_types(q.dtype, v.dtype)), inner

    def extra_repr(self) -> str:
        return f"layer={self.layer}, scaling={self.scaling:.4g}, softcap={self.softcap}" + (", sinks" if self.sinks else "")


class _NormCore(FastCallModule):
    """A norm core the graph calls with the normalisation's operands; a user calling it with the residual alone
    (TransformerLens's ``model.ln_final(x)``, ``model.blocks[i].ln1(x)``) gets the whole HF norm module's output
    (weight, bias, Gemma's 1 + w included), computed by that module. The hook points fire only inside the graph."""

    hf_path = ""  # the HF norm module (set by hook_norms), bound to the module itself by bind_hf

    def bind_hf(self, module: torch.nn.Module) -> None:
        self.__dict__["_fxb_hf"] = weakref.ref(module)  # not a child: its weights stay the HF model's alone

    def _hf_module(self) -> torch.nn.Module:
        ref = self.__dict__.get("_fxb_hf")
        module = ref() if ref is not None else None
        if module is None:
            raise TypeError(f"this norm core is not bound to its HF module ({self.hf_path or 'unknown'}): call it "
                            "through a traced module (gm.ln_final(x))")
        return module

    def _hf_norm(self, x):
        return self._hf_module()(x)

    @property
    def w(self) -> torch.Tensor:
        """The HF norm's weight, as stored (TransformerLens's ``ln.w``; Gemma's is the w of 1 + w)."""
        return self._hf_module().weight

    @property
    def b(self) -> torch.Tensor:
        bias = getattr(self._hf_module(), "bias", None)
        if bias is None:
            raise AttributeError(f"{self.hf_path} has a weight w and no bias b")
        return bias


class RMSNormCore(_NormCore):
    """x * rsqrt(var_eps) as HF writes it; hooked: scale = sqrt(var_eps) [B,S,1], normalized = x / scale."""

    def __init__(self):
        super().__init__()
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def fake_values(self, x, var_eps):
        shape = torch.broadcast_shapes(x.shape, var_eps.shape)
        out = x.new_empty(shape, dtype=torch.promote_types(x.dtype, var_eps.dtype))
        return out, {"hook_scale": var_eps.new_empty(var_eps.shape), "hook_normalized": out}

    def forward(self, x, var_eps=None):
        if var_eps is None:  # a user's call with the residual alone
            return self._hf_norm(x)
        if not (self.hook_scale.has_hooks or self.hook_normalized.has_hooks):
            return x * torch.rsqrt(var_eps)
        scale = self.hook_scale(torch.sqrt(var_eps))
        return self.hook_normalized(x / scale)


class LayerNormCore(_NormCore):
    """F.layer_norm as HF calls it; hooked: centred x / scale with scale = sqrt(var + eps), then weight and bias."""

    def __init__(self, normalized_shape, eps: float, affine: bool = True):
        super().__init__()
        self.normalized_shape, self.eps = tuple(normalized_shape), float(eps)
        self.affine = affine  # the graph passes a weight / bias: a call with x alone is then a user's
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def fake_values(self, x, weight=None, bias=None):
        compute = torch.promote_types(x.dtype, torch.float32)  # as the hooked path computes
        scale = x.new_empty((*x.shape[:-1], 1), dtype=compute)
        return x.new_empty(x.shape), {"hook_scale": scale, "hook_normalized": x.new_empty(x.shape, dtype=compute)}

    def forward(self, x, weight=None, bias=None):
        if weight is None and bias is None and self.affine:  # a user's call with the residual alone
            return self._hf_norm(x)
        if not (self.hook_scale.has_hooks or self.hook_normalized.has_hooks):
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp16/bf16 up to float32 as F.layer_norm; float64 kept
        centred = xf - xf.mean(-1, keepdim=True)
        scale = self.hook_scale((centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        out = self.hook_normalized(centred / scale)
        if weight is not None:
            out = out * weight
        if bias is not None:
            out = out + bias
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"
