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
- MoE block next to the dense MLP: the MoE contract's ``blocks.{i}.mlp.hook_router_logits`` / ``hook_router_probs`` /
  ``hook_expert_indices`` / ``hook_routing_weights`` / ``hook_expert_out`` (the old ``moe.*`` names are aliases) and
  ``blocks.{i}.hook_moe_out``; ``hook_mlp_out`` (post_feedforward_layernorm) is the dense MLP and the MoE together
  (``hook_moe``).
- ``layer_scalar``: the layer multiplies its output by it, so
  ``resid_post = layer_scalar * (resid_mid + mlp_out + ple_out)`` (resid_post is HF's layer output).
- Final-logit softcap: ``hook_unembed`` before it, ``hook_logits`` after (``hook_final_softcap``).
"""
from dataclasses import replace

from ..passes import (alias_shared_kv, hook_attention, hook_embeddings, hook_final_softcap, hook_mlp, hook_moe,
                      hook_norms, hook_per_layer_embeddings, hook_residual, hook_shared_qkv, hook_unembed,
                      route_shared_kv)
from .gemma import GEMMA3_TEXT


def _dims(config) -> dict[str, int]:
    """Sizes of the Gemma-4-only parts, present only when the config has them (they set passes' match counts).

    n_kv_shared_layers: last layers reusing earlier layers' k/v; d_per_layer_input: per-layer embedding width;
    n_experts / top_k: mixture-of-experts block (when the config enables it).
    """
    dims = {}
    if getattr(config, "num_kv_shared_layers", None):
        dims["n_kv_shared_layers"] = int(config.num_kv_shared_layers)
    if getattr(config, "hidden_size_per_layer_input", None):
        dims["d_per_layer_input"] = int(config.hidden_size_per_layer_input)
    if getattr(config, "enable_moe_block", False) and getattr(config, "num_experts", None):
        dims["n_experts"] = int(config.num_experts)
        dims["top_k"] = int(config.top_k_experts)
    return dims


def _configure(config) -> dict:
    """Every layer runs the MoE branch beside its dense MLP when the config enables it."""
    moe = bool(_dims(config).get("n_experts"))
    return dict(moe_layers=tuple(range(config.num_hidden_layers)) if moe else (), moe_beside_mlp=True)


# Gemma 3's sandwich norms and final softcap; the Gemma-4-only passes around them, with HF's module names.
GEMMA4_TEXT = replace(
    GEMMA3_TEXT,
    model_types=("gemma4_text",),
    family="Gemma 4 (text)",
    notes=("q/k/v norms, KV sharing across layers, `attention_k_eq_v`, per-layer embeddings (`ple.*`), an MoE branch beside the dense MLP when `enable_moe_block` (`mlp.hook_router_logits` ..., `hook_moe_out`), "
           "`layer_scalar`, per-layer head sizes; real pre-softmax scores whose edits take effect"),
    requires=("Gemma4TextConfig",),  # transformers >= 5.5
    dims_of=_dims,
    configure=_configure,
    passes=(
        hook_embeddings,
        alias_shared_kv, hook_attention, route_shared_kv,  # KV-shared layers read their owner's hooked keys
        hook_shared_qkv(v_norm="v_norm"),
        hook_mlp, hook_norms, hook_residual,
        hook_per_layer_embeddings(gate="per_layer_input_gate", act="act_fn", out_norm="post_per_layer_input_norm"),
        hook_moe(router="router", experts="experts", probs=True, out_norm="post_feedforward_layernorm_2"),
        hook_unembed, hook_final_softcap,
    ),
)

SPECS = (GEMMA4_TEXT,)
