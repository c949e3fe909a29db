"""Attention math, in one place: HF's eager attention (with hook callbacks) and the fused SDPA call HF makes.

``tracer/attention_op.py``'s custom op computes ``eager_attention`` while capturing; ``AttentionCore`` runs
``fused_attention`` while none of its hooks is attached and ``eager_attention`` (with its hook points) otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def eager_attention(q, k, v, mask, scaling: float, softcap: Optional[float], scores_hook=None, pre_cap_hook=None,
                    pattern_hook=None, sinks=None, sinks_hook=None):
    """HF's eager attention (``eager_attention_forward`` + Gemma's softcap), with optional hook callbacks.

    q [B,H,Sq,dh], k/v [B,Hkv,Sk,dh], mask additive [B,1|H,Sq,Sk] or None. Returns z [B,Sq,H,dh].
    ``sinks`` [H] (gpt_oss ``s_aux``): a learned logit per head joins each softmax row as one more column after the
    mask and is dropped after the softmax, as HF's gpt_oss eager attention (max subtracted, softmax in the
    scores' dtype); the pattern is then over the real keys only and its rows sum to less than 1. ``sinks_hook``
    sees a copy of the sinks (an in-place edit never reaches the parameter), after ``scores_hook``.
    """
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    # In-place on tensors made right here (same values as HF's out-of-place ops): one [B,H,Sq,Sk] buffer fewer
    # at peak. Nothing has seen `scores` yet at either in-place step (the pre-cap hook sees it before tanh).
    scores = torch.matmul(q, k.transpose(2, 3)).mul_(scaling)
    if softcap is not None:
        if pre_cap_hook is not None:
            scores = pre_cap_hook(scores)
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.add_(mask) if mask.dtype == scores.dtype else scores + mask
    if scores_hook is not None:
        scores = scores_hook(scores)
    if sinks is not None:
        pattern = _softmax_with_sinks(scores, sinks if sinks_hook is None else sinks_hook(sinks.clone())).to(v.dtype)
    else:
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if pattern_hook is not None:
        pattern = pattern_hook(pattern)
    return torch.matmul(pattern, v).transpose(1, 2).contiguous()


def _softmax_with_sinks(scores, sinks):
    """softmax([scores, sink_h]) over the last dim, the sink column dropped: HF's gpt_oss ``eager_attention_forward``
    (the row max subtracted first, the softmax in the concatenation's dtype)."""
    batch, heads, q_len, _ = scores.shape
    combined = torch.cat([scores, sinks.reshape(1, -1, 1, 1).expand(batch, heads, q_len, 1)], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    return torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]


def is_plain_causal(mask: torch.Tensor | None, q_len: int, k_len: int) -> bool:
    """Whether additive ``mask`` [B,1|H,S,S] is exactly HF's causal mask (0 on and below the diagonal, finfo.min
    above): no padding, no sliding window cutting inside the sequence. Then SDPA's ``is_causal=True`` computes the
    same softmax (masked entries contribute exactly 0 either way) and may use the flash kernel.

    The answer is stored on the mask tensor, so the layers sharing one mask in a forward check it once (one
    comparison and one device sync per distinct mask, as HF's own padding check costs).
    """
    if mask is None or q_len != k_len or q_len < 2 or mask.dim() != 4 or not mask.is_floating_point():
        return False
    if torch.compiler.is_compiling():  # the check reads the mask's values: a graph break per layer under compile;
        return False  # the explicit mask computes the same softmax (masked entries contribute exactly 0 either way)
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
