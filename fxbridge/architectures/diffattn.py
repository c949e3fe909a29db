"""Differential attention (DiffLlama) and mixture of attention heads (JetMoE).

DiffLlama: Llama with ``DiffLlamaAttention``, which calls the attention function twice (same q/k, the two halves of
V) and combines ``z1 - lambda * z2`` over head pairs, then a weightless RMSNorm (``groupnorm``) and
``(1 - lambda_init)`` before ``o_proj``. ``hook_diff_attention`` merges the two calls into one core:
``hook_attn_scores`` / ``hook_pattern`` [B,H,S,S] hold both maps (differential head j: query heads j and j + H/2),
``hook_diff_pattern`` [B,H/2,S,S] their difference ``A_j - lambda A_{j+H/2}``, ``hook_lambda`` the scalar lambda,
``hook_diff`` [B,S,H/2,2dh] the difference times the values (before the group norm) and ``hook_z`` the o_proj
input seen as [B,S,H,dh] (slot 2j+c: differential head j's normalised output over value half c).

JetMoE: attention is ``JetMoeMoA``, a mixture of attention heads -- a top-K router per token picks K query /
output projection experts (``experts.input_linear`` / ``output_linear``); keys and values come from one shared
``kv_proj``, so there are H = K * Hkv query heads (head ``k*Hkv + j``: slot k over key/value head j). The MLP is
``JetMoeMoE`` (its own top-K gating and parallel experts, a GLU in each expert, a bias after the sum). Both are
hooked by ``hook_jetmoe``: ``attn.hook_router_logits`` / ``hook_expert_indices`` / ``hook_routing_weights`` /
``hook_expert_out`` and the same four under ``mlp.``; the gating picks the top-K logits and softmaxes them (no
``hook_router_probs``: nothing is computed over all E experts but the logits).
"""
from ..passes import (hook_diff_attention, hook_embeddings, hook_jetmoe, hook_mlp, hook_norms, hook_qkv, hook_residual,
                      hook_unembed)
from .spec import ArchSpec

DIFFLLAMA = ArchSpec(
    model_types=("diffllama",), family="DiffLlama",
    passes=(hook_embeddings, hook_diff_attention, hook_qkv, hook_mlp, hook_norms, hook_residual, hook_unembed),
    notes="differential attention: two softmax maps per head pair in `hook_pattern` (heads j, j+H/2), their "
          "difference `attn.hook_diff_pattern` [B,H/2,S,S], `attn.hook_lambda`, `attn.hook_diff` [B,S,H/2,2dh] "
          "before the group norm; `hook_z` is the o_proj input [B,S,H,dh]")



def _jetmoe_dims(config) -> dict[str, int]:
    return {"d_head": int(config.kv_channels), "n_experts": int(config.num_local_experts),
            "top_k": int(config.num_experts_per_tok)}


JETMOE = ArchSpec(
    model_types=("jetmoe",), family="JetMoE", attn="self_attention", q=None, k=None, v=None, o_proj="experts",
    mlp="mlp", mlp_gate=None, mlp_in="input_linear", mlp_out="output_linear", dims_of=_jetmoe_dims,
    configure=lambda config: dict(moe_layers=tuple(range(config.num_hidden_layers))),  # every MLP is the MoE
    passes=(hook_embeddings, hook_jetmoe, hook_norms, hook_residual, hook_unembed),
    no_attn_result="its output projection is a mixture of experts (each slot's expert output is "
                   "`attn.hook_expert_out`), not one W_O to split per head",
    notes="mixture of attention heads: a top-K router picks the query/output experts (`attn.hook_router_logits`, "
          "`hook_expert_indices`, `hook_routing_weights`, `hook_expert_out` [B,S,K,D]); H = K x kv heads, head "
          "k*Hkv+j = slot k over kv head j; MoE MLP with its own gating: `mlp.hook_router_logits` ... "
          "`mlp.hook_expert_out`, no dense-MLP hooks")

SPECS = (DIFFLLAMA, JETMOE)
