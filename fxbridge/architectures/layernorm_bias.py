"""LayerNorm (with bias) decoders with rotary attention: StarCoder 2, StableLM, Persimmon.

- StarCoder 2: biases on every projection (``use_bias``), non-gated ``c_fc`` / ``c_proj`` MLP, sliding window
  (carried by HF's mask), functional eval dropout after attention and MLP (removed, an identity in eval).
- StableLM: partial rotary (``hook_rot_q/k`` see the full head vector: rotated part and pass-through), gated
  MLP, optional per-head q/k LayerNorms (``qk_layernorm``: between ``hook_q``/``hook_k`` and ``hook_rot_q``/
  ``hook_rot_k``) and optional parallel residual (``use_parallel_residual``: one norm, no ``ln2`` hooks and no
  ``hook_resid_mid``; resid_post = resid_pre + attn_out + mlp_out).
- Persimmon: fused ``query_key_value`` viewed [B,S,H,3,dh] ("per_head" layout), q/k LayerNorms per head (after
  ``hook_q``/``hook_k``), partial rotary, ReLU^2 MLP, final norm ``model.final_layernorm``.
"""
from ..passes import (hook_attention, hook_embeddings, hook_mlp, hook_norms, hook_qkv, hook_residual, hook_unembed,
                      split_fused_qkv)
from .spec import ArchSpec

STARCODER2 = ArchSpec(
    model_types=("starcoder2",), family="StarCoder 2", mlp_gate=None, mlp_in="c_fc", mlp_out="c_proj",
    norm="layernorm", notes="LayerNorm with bias, biases on projections, non-gated MLP, sliding window")


def _stablelm(config) -> dict:
    parallel = bool(config.use_parallel_residual)
    return {"parallel": parallel, "ln2": None if parallel else "post_attention_layernorm"}


STABLELM = ArchSpec(
    model_types=("stablelm",), family="StableLM", norm="layernorm", configure=_stablelm,
    notes="partial rotary; optional per-head q/k LayerNorm; optional parallel residual (use_parallel_residual)")

PERSIMMON = ArchSpec(
    model_types=("persimmon",), family="Persimmon", final_norm="model.final_layernorm", o_proj="dense",
    q=None, k=None, v=None, qkv="query_key_value", qkv_layout="per_head",
    mlp_gate=None, mlp_in="dense_h_to_4h", mlp_out="dense_4h_to_h", norm="layernorm",
    notes="fused query_key_value per head; q/k LayerNorm; partial rotary; ReLU^2 MLP",
    passes=(hook_embeddings, hook_attention, split_fused_qkv, hook_mlp, hook_norms, hook_residual, hook_unembed),
)

SPECS = (STARCODER2, STABLELM, PERSIMMON)
