"""Gemma 4 (text, ``Gemma4ForCausalLM``): Gemma 3's sandwich norms and scaled embedding, plus Gemma-4-only parts.

Where each Gemma 4 convention is handled (the README's conventions table has one row each):
- RMSNorm writes ``x * pow(mean(x^2) + eps, -0.5)`` and multiplies by ``w`` (not ``1 + w``): ``hook_norms``
  accepts the pow form (ATen computes it as rsqrt, bit-identical); ``hook_normalized`` is before ``w``.
- q/k/v norms: ``hook_q``/``hook_k``/``hook_v`` are the projection outputs before ``q_norm``/``k_norm``/
  ``v_norm`` (v_norm has no weight); ``hook_rot_q``/``hook_rot_k`` are after norm and RoPE (``hook_shared_qkv``).
- Attention scale 1.0 (the q/k norms replace 1/sqrt(dh)), no attention softcap; sliding and full layers
  (``layer_types``) differ in mask, rotary (full: proportional RoPE on a fraction of dh), head size
  (``global_head_dim``) and KV heads (``num_global_key_value_heads``). Mask and scale are carried by the
  captured attention call; sizes are read per layer from HF's own per-head view.
- ``attention_k_eq_v`` (full layers have no v_proj; v is the k projection): ``hook_v`` is the k projection
  output on the value path, fired after ``hook_k`` (editing hook_k changes keys and values, hook_v values only).
- KV sharing (``num_kv_shared_layers``): the last layers have no k/v projections and reuse the keys/values of
  the last earlier layer of the same type. They have no ``hook_k``/``hook_v``; their ``hook_rot_k`` fires with
  the reused keys (edits reach that layer only), which are read after the owner's ``hook_rot_k``, so editing
  the owner's keys reaches every layer that reuses them, as in HF (``alias_shared_kv``, ``route_shared_kv``).
- Per-layer embeddings (PLE): ``blocks.{i}.ple.hook_per_layer_input`` / ``ple.hook_gate`` / ``ple.hook_gated``
  [B,S,P] and ``blocks.{i}.hook_ple_out`` [B,S,D] (``hook_per_layer_embeddings``).
- MoE block next to the dense MLP: ``blocks.{i}.moe.*`` router/expert hooks and ``blocks.{i}.hook_moe_out``;
  ``hook_mlp_out`` (post_feedforward_layernorm) is the dense MLP and the MoE together (``hook_moe``).
- ``layer_scalar``: the layer multiplies its output by it, so
  ``resid_post = layer_scalar * (resid_mid + mlp_out + ple_out)`` (resid_post is HF's layer output).
- Final-logit softcap: ``hook_unembed`` before it, ``hook_logits`` after (``hook_final_softcap``).
"""
from dataclasses import replace

from .gemma import GEMMA3_TEXT

# Gemma 3's sandwich norms and final softcap; the Gemma-4-only passes around them.
GEMMA4_TEXT = replace(
    GEMMA3_TEXT,
    model_types=("gemma4_text",),
    family="Gemma 4 (text)",
    notes="sandwich norms; q/k/v norms; KV sharing; k=v attention; per-layer embeddings; MoE; layer_scalar",
    requires=("Gemma4TextConfig",),  # transformers >= 5.5
    passes=("hook_embeddings", "alias_shared_kv", "hook_attention", "route_shared_kv", "hook_shared_qkv", "hook_mlp",
            "hook_norms", "hook_residual", "hook_per_layer_embeddings", "hook_moe", "hook_unembed",
            "hook_final_softcap"),
)

SPECS = (GEMMA4_TEXT,)
