"""DeepSeek V2 / V3: multi-head latent attention (MLA) and a mixture of experts after the first dense layers.

Attention (``passes/hook_mla.py``): the query and the keys/values are computed from low-rank latents
(``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``; ``kv_a_proj_with_mqa`` -> ``kv_a_layernorm`` -> ``kv_b_proj``),
and every head's key ends in one rotary part all heads share. Hooks: ``attn.hook_q_latent`` (only with a query
LoRA: V2-Lite has ``q_lora_rank=None`` and a plain ``q_proj``), ``attn.hook_kv_latent``, ``attn.hook_q``
[B,S,H,dqk] (the query projection per head, before RoPE), ``attn.hook_k`` [B,S,H,dn] (the per-head key part from
``kv_b_proj``; no position information), ``attn.hook_k_rope`` [B,S,1,dr] (the shared rotary key after RoPE),
``attn.hook_v`` [B,S,H,dv], then ``hook_rot_q`` / ``hook_rot_k`` [B,S,H,dqk] (what enters q.k^T), scores,
pattern, ``hook_z`` [B,S,H,dv]. V2 rotates with complex numbers, V3 with cos/sin (interleaved or not): both are
HF's own code in the graph.

Sizes: ``d_head`` is the q/k head (qk_nope + qk_rope), ``d_head_v`` the value head; the keys entering attention
have one head per query head (``n_kv_heads = n_heads``).
"""
from dataclasses import replace

from ..passes import (hook_attention, hook_embeddings, hook_mla, hook_mlp, hook_moe, hook_norms, hook_residual,
                      hook_unembed)
from .moe import moe_dims, moe_layers_of
from .spec import ArchSpec


def _mla_dims(config) -> dict[str, int]:
    dn, dr = int(config.qk_nope_head_dim), int(config.qk_rope_head_dim)
    dims = {"d_head": dn + dr, "d_nope": dn, "d_rope": dr, "d_head_v": int(config.v_head_dim),
            "kv_lora_rank": int(config.kv_lora_rank), "n_kv_heads": int(config.num_attention_heads)}
    dims.update(moe_dims(config))
    if getattr(config, "q_lora_rank", None):
        dims["q_lora_rank"] = int(config.q_lora_rank)
    return dims


def _configure(config) -> dict:
    return {"moe_layers": moe_layers_of(config)}  # layers from first_k_dense_replace on


# MoE layers (``mlp`` = DeepseekV2Moe / DeepseekV3MoE): router ``mlp.gate`` (its E-output matmul: the logits),
# fused experts ``mlp.experts`` (indices / weights as they receive them: after V3's sigmoid + correction-bias
# grouped top-k, norm_topk_prob and routed_scaling_factor, V2's softmax greedy / group-limited top-k and scale),
# ``mlp.shared_experts`` (no gate); dense layers keep hook_pre / hook_pre_linear / hook_post.
_PASSES = (hook_embeddings, hook_mla, hook_attention, hook_mlp, hook_norms, hook_residual, hook_unembed,
           hook_moe(router="mlp.gate", experts="mlp.experts", shared="mlp.shared_experts"))

DEEPSEEK_V3 = ArchSpec(
    model_types=("deepseek_v3",), family="DeepSeek V3", q=None, k=None, v=None, dims_of=_mla_dims,
    configure=_configure,
    notes="multi-head latent attention (`attn.hook_q_latent` / `hook_kv_latent` / `hook_k_rope`); sigmoid router "
          "with grouped top-k, shared experts, dense first layers",
    passes=_PASSES)
DEEPSEEK_V2 = replace(
    DEEPSEEK_V3, model_types=("deepseek_v2",), family="DeepSeek V2",
    notes="multi-head latent attention (complex-number RoPE; no query LoRA in V2-Lite); softmax router, shared "
          "experts, dense first layers")

SPECS = (DEEPSEEK_V3, DEEPSEEK_V2)
