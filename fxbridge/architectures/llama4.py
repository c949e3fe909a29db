"""Llama 4 (text, ``Llama4ForCausalLM`` with a ``Llama4TextConfig``).

Where each Llama 4 convention is handled:
- RoPE as complex multiplication (``view_as_complex`` of interleaved pairs, ``freqs_cis``): HF's own code in the
  captured graph; ``hook_rot_q/k`` are the vectors entering attention (after RoPE and the L2 q/k norm).
- q/k L2 norm (``use_qk_norm``, no weight) after RoPE, only on RoPE layers: inside ``hook_rot_q/k``; ``hook_q/k``
  are the projection outputs.
- NoPE layers (``no_rope_layers[i] == 0``): no ``hook_rot_q/k`` there (``hook_attention`` reads it from the graph).
  Their attention temperature tuning (``attn_temperature_tuning``: q x (1 + attn_scale * log1p(floor((pos+1) /
  floor_scale)))) is part of the scores (``hook_attn_scores``); ``hook_q`` is before it.
- Chunked attention (``attention_chunk_size``, RoPE layers): HF's chunked causal mask is the mask the attention call
  gets; ``hook_attn_scores`` holds it (finfo.min outside the chunk).
- Interleaved dense / MoE layers (``moe_layers`` from ``interleave_moe_layer_step``): dense layers have
  ``mlp.hook_pre`` / ``hook_pre_linear`` / ``hook_post`` (width ``intermediate_size_mlp``); MoE layers have the
  ``mlp.hook_router_logits`` / ``hook_expert_indices`` / ``hook_routing_weights`` / ``hook_expert_out`` /
  ``hook_shared_out`` hooks (``hook_scaled_input_moe``); ``hook_mlp_out`` is the block output on both.
- MoE: sigmoid of the top-k router logits scales each expert's INPUT; ``hook_expert_out`` is expert(w * x) per slot.
"""
from ..passes import (hook_attention, hook_embeddings, hook_mlp, hook_norms, hook_qkv, hook_residual,
                      hook_scaled_input_moe, hook_unembed)
from .spec import ArchSpec


def _dims(config) -> dict[str, int]:
    """MoE sizes: experts and top k."""
    return {"n_experts": int(config.num_local_experts), "top_k": int(config.num_experts_per_tok)}


LLAMA4_TEXT = ArchSpec(
    model_types=("llama4_text",), family="Llama 4 (text)", mlp="feed_forward", dims_of=_dims,
    configure=lambda config: {"moe_layers": tuple(config.moe_layers)},  # HF's own list (interleave_moe_layer_step)
    requires=("Llama4TextConfig",),
    notes=("complex RoPE + L2 q/k norm (in `hook_rot_q/k`), NoPE layers with temperature tuning, chunked attention; "
           "interleaved dense / MoE layers: sigmoid top-k router scaling the experts' inputs, a shared expert "
           "(`mlp.*`)"),
    passes=(hook_embeddings, hook_attention, hook_qkv, hook_mlp, hook_norms,
            hook_scaled_input_moe(moe="feed_forward", router="feed_forward.router", experts="feed_forward.experts",
                                  shared="feed_forward.shared_expert"),
            hook_residual, hook_unembed),
)

SPECS = (LLAMA4_TEXT,)
