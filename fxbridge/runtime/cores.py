"""Regions that HF computes fused and TransformerLens hooks in the middle of.

A core replaces a small piece of the captured graph (the attention call, a norm's normalisation) with one
``call_module`` node. Its hook points are its children. While none of them has a hook attached, the core runs
the same fused op HF runs (``scaled_dot_product_attention``, ``x * rsqrt(v)``, ``layer_norm``); once one is hooked
it computes the intermediate values explicitly, exactly as HF's eager code does, so hooks see the real values and
their edits take effect (DESIGN.md principle 4: pay only for what is hooked).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..tracer.attention_op import eager_attention
from .hook_point import FastCallModule, HookPoint


class AttentionCore(FastCallModule):
    """softmax(q k^T * scale [-> softcap] + mask) v for one layer; q [B,H,S,dh], k/v [B,Hkv,S,dh] -> z [B,S,H,dh].

    ``force_eager`` makes it always materialise scores and pattern (useful to compare the two paths).
    """

    def __init__(self, scaling: float, softcap: float | None, layer: int):
        super().__init__()
        self.scaling, self.softcap, self.layer = float(scaling), softcap, layer
        self.force_eager = False
        if softcap is not None:  # children in firing order: hook_dict lists a core's points in this order
            self.hook_attn_scores_pre_cap = HookPoint(shape=("B", "H", "S", "S"))
        self.hook_attn_scores = HookPoint(shape=("B", "H", "S", "S"))
        self.hook_pattern = HookPoint(shape=("B", "H", "S", "S"))

    def needs_eager(self) -> bool:
        """True when this layer must materialise scores/pattern (a hook on them, softcap, or forced)."""
        return (self.force_eager or self.softcap is not None
                or self.hook_attn_scores.has_hooks or self.hook_pattern.has_hooks)

    def forward(self, q, k, v, mask):
        if not self.needs_eager():
            return fused_attention(q, k, v, mask, self.scaling)
        pre_cap = getattr(self, "hook_attn_scores_pre_cap", None)
        return eager_attention(
            q, k, v, mask, self.scaling, self.softcap,
            scores_hook=self.hook_attn_scores,
            pre_cap_hook=pre_cap if pre_cap is not None and pre_cap.has_hooks else None,
            pattern_hook=self.hook_pattern,
        )

    def extra_repr(self) -> str:
        return f"layer={self.layer}, scaling={self.scaling:.4g}, softcap={self.softcap}"


def is_plain_causal(mask: torch.Tensor | None, q_len: int, k_len: int) -> bool:
    """Whether additive ``mask`` [B,1|H,S,S] is exactly HF's causal mask (0 on and below the diagonal, finfo.min
    above): no padding, no sliding window cutting inside the sequence. Then SDPA's ``is_causal=True`` computes the
    same softmax (masked entries contribute exactly 0 either way) and may use the flash kernel.

    The answer is stored on the mask tensor, so the layers sharing one mask in a forward check it once (one
    comparison and one device sync per distinct mask, as HF's own padding check costs).
    """
    if mask is None or q_len != k_len or q_len < 2 or mask.dim() != 4 or not mask.is_floating_point():
        return False
    cached = getattr(mask, "_fxbridge_plain_causal", None)
    if cached is None:
        if mask.device.type == "meta":
            return False
        above = torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).triu_(1)
        expected = torch.zeros(q_len, k_len, dtype=mask.dtype, device=mask.device)
        expected.masked_fill_(above, torch.finfo(mask.dtype).min)
        cached = bool(torch.equal(mask, expected.expand(mask.shape)))
        try:
            mask._fxbridge_plain_causal = cached
        except (AttributeError, RuntimeError):  # e.g. tensor subclasses that refuse attributes
            pass
    return cached


def fused_attention(q, k, v, mask, scaling: float):
    """HF's ``sdpa_attention_forward`` on the captured inputs: ``is_causal`` without a mask when the mask is plainly
    causal, GQA inside SDPA only without a mask (as HF decides; CUDA kernels with a mask need repeated heads)."""
    n_rep = q.shape[1] // k.shape[1]
    is_causal = is_plain_causal(mask, q.shape[2], k.shape[2])
    if is_causal:
        mask = None
    extra = {}
    if n_rep > 1:
        if mask is None and k.shape[-1] == v.shape[-1] <= 256:
            extra["enable_gqa"] = True
        else:
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, is_causal=is_causal, **extra)
    return out.transpose(1, 2).contiguous()


class RMSNormCore(FastCallModule):
    """x * rsqrt(var_eps) as HF writes it; hooked: scale = sqrt(var_eps) [B,S,1], normalized = x / scale."""

    def __init__(self):
        super().__init__()
        self.hook_scale = HookPoint(shape=("B", "S", "1"))
        self.hook_normalized = HookPoint(shape=("B", "S", "D"))

    def forward(self, x, var_eps):
        if not (self.hook_scale.has_hooks or self.hook_normalized.has_hooks):
            return x * torch.rsqrt(var_eps)
        scale = self.hook_scale(torch.sqrt(var_eps))
        return self.hook_normalized(x / scale)


class LayerNormCore(FastCallModule):
    """F.layer_norm as HF calls it; hooked: centred x / scale with scale = sqrt(var + eps), then weight and bias."""

    def __init__(self, normalized_shape, eps: float):
        super().__init__()
        self.normalized_shape, self.eps = tuple(normalized_shape), float(eps)
        self.hook_scale = HookPoint(shape=("B", "S", "1"))
        self.hook_normalized = HookPoint(shape=("B", "S", "D"))

    def forward(self, x, weight=None, bias=None):
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
