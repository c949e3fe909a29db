"""Differential attention (DiffLlama) and mixture of attention heads (JetMoE).

DiffLlama: Llama with ``DiffLlamaAttention``, which calls the attention function twice (same q/k, the two halves of
V) and combines ``z1 - lambda * z2`` over head pairs, then a weightless RMSNorm (``groupnorm``) and
``(1 - lambda_init)`` before ``o_proj``. ``hook_diff_attention`` merges the two calls into one core:
``hook_attn_scores`` / ``hook_pattern`` [B,H,S,S] hold both maps (differential head j: query heads j and j + H/2),
``hook_diff_pattern`` [B,H/2,S,S] their difference ``A_j - lambda A_{j+H/2}``, ``hook_lambda`` the scalar lambda,
``hook_diff`` [B,S,H/2,2dh] the difference times the values (before the group norm) and ``hook_z`` the o_proj
input seen as [B,S,H,dh] (slot 2j+c: differential head j's normalised output over value half c).
"""
from ..passes import hook_diff_attention, hook_embeddings, hook_mlp, hook_norms, hook_qkv, hook_residual, hook_unembed
from .spec import ArchSpec

DIFFLLAMA = ArchSpec(
    model_types=("diffllama",), family="DiffLlama",
    passes=(hook_embeddings, hook_diff_attention, hook_qkv, hook_mlp, hook_norms, hook_residual, hook_unembed),
    notes="differential attention: two softmax maps per head pair in `hook_pattern` (heads j, j+H/2), their "
          "difference `attn.hook_diff_pattern` [B,H/2,S,S], `attn.hook_lambda`, `attn.hook_diff` [B,S,H/2,2dh] "
          "before the group norm; `hook_z` is the o_proj input [B,S,H,dh]")

SPECS = (DIFFLLAMA,)
