"""LayerNorm (with bias) decoders with rotary attention: StarCoder 2, StableLM, Persimmon.

- StarCoder 2: biases on every projection (``use_bias``), non-gated ``c_fc`` / ``c_proj`` MLP, sliding window
  (carried by HF's mask).
- StableLM: partial rotary (``hook_rot_q/k`` see the full head vector: rotated part and pass-through), gated
  MLP, optional per-head q/k LayerNorms (``qk_layernorm``: between ``hook_q``/``hook_k`` and ``hook_rot_q``/
  ``hook_rot_k``) and optional parallel residual (``use_parallel_residual``: one norm, no ``ln2`` hooks and no
  ``hook_resid_mid``; resid_post = resid_pre + attn_out + mlp_out).
- Persimmon: fused ``query_key_value`` viewed [B,S,H,3,dh] ("per_head" layout), q/k LayerNorm over each head
  vector (after ``hook_q``/``hook_k``), partial rotary, ReLU^2 MLP, final norm ``model.final_layernorm``.
All three call dropout (an identity in eval) between a branch and its residual add; ``remove_eval_dropout``
removes those calls, so ``hook_attn_out`` / ``hook_mlp_out`` feed the adds directly.
"""
from ..passes import (hook_attention, hook_embeddings, hook_mlp, hook_norms, hook_residual, hook_unembed,
                      remove_eval_dropout, split_fused_qkv)
from .spec import DEFAULT_PASSES, ArchSpec


def _without_dropout(per_layer: int, passes=DEFAULT_PASSES) -> tuple:
    """The eval-mode dropout calls between the branches and the residual adds removed (identities), then ``passes``."""
    return (remove_eval_dropout(per_layer=per_layer), *passes)


STARCODER2 = ArchSpec(
    model_types=("starcoder2",), family="StarCoder 2", mlp_gate=None, mlp_in="c_fc", mlp_out="c_proj",
    norm="layernorm", notes="LayerNorm with bias, biases on every projection, GELU MLP (`c_fc`/`c_proj`), sliding window (in the mask)",
    passes=_without_dropout(2))


def _stablelm(config) -> dict:
    parallel = bool(config.use_parallel_residual)
    return {"parallel": parallel, "ln2": None if parallel else "post_attention_layernorm"}


STABLELM = ArchSpec(
    model_types=("stablelm",), family="StableLM", norm="layernorm", configure=_stablelm, passes=_without_dropout(1),
    notes=("partial rotary; optional per-head q/k LayerNorms (between `hook_q/k` and `hook_rot_q/k`); "
           "`use_parallel_residual`: parallel blocks, no `ln2` hooks and no `hook_resid_mid`"))

PERSIMMON = ArchSpec(
    model_types=("persimmon",), family="Persimmon", final_norm="model.final_layernorm", o_proj="dense",
    q=None, k=None, v=None, qkv="query_key_value", qkv_layout="per_head",
    mlp_gate=None, mlp_in="dense_h_to_4h", mlp_out="dense_4h_to_h", norm="layernorm",
    notes="fused `query_key_value` per head `[q_h,k_h,v_h]`; q/k LayerNorm; partial rotary; ReLU² MLP",
    passes=_without_dropout(1, (hook_embeddings, hook_attention, split_fused_qkv, hook_mlp, hook_norms, hook_residual,
                                hook_unembed)),
)

SPECS = (STARCODER2, STABLELM, PERSIMMON)
