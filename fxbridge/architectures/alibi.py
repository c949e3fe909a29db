"""ALiBi families: Bloom and MPT (no position embeddings; the bias is part of hook_attn_scores).

Both compute attention inline; ``capture_eager_attention`` turns it into the common attention node:
- Bloom: ``alibi.baddbmm(q, kᵀ, beta=1, alpha=1/sqrt(dh))`` on [B*H,S,dh] operands, scores viewed to
  [B,H,S,S] and the additive mask added. The pass reads baddbmm's input (the ALiBi bias, [B*H,1,S], built from the
  attention mask so left padding matches HF) as an additive term: ``hook_attn_scores = q.kᵀ/sqrt(dh) + alibi + mask``.
  The fused ``query_key_value`` is per head, [q_h, k_h, v_h] x H ("per_head").
  ``word_embeddings_layernorm`` normalises the embeddings before layer 0: hooked as ``ln_embed.hook_scale`` /
  ``ln_embed.hook_normalized`` (``hook_embed`` is the embedding output before it).
- MPT: ``q.kᵀ * softmax_scale + alibi[:, -S:, -S:]`` then ``masked_fill(mask, finfo.min)`` (read as an additive
  ``0 / finfo.min`` term); fused ``Wqkv`` is [q | k | v]. The ALiBi table is built for ``max_seq_len`` and sliced
  by the sequence length, which makes torch.export guard on the length: tracer/capture.py re-exports with
  dynamic-dim hints (no fixed length).
Both add the residual inside the attention / MLP modules (Bloom's ``dropout_add``, MPT's ``output + residual``),
so ``hook_attn_out`` / ``hook_mlp_out`` are the output projections' outputs (``attn_out_at`` / ``mlp_out_at``) and
the residual adds are resid_mid / resid_post. MPT's LayerNorms have no bias.
"""
from ..passes import (capture_eager_attention, hook_attention, hook_embeddings, hook_mlp, hook_norms, hook_residual,
                      hook_unembed, remove_eval_dropout, split_fused_qkv)
from .spec import ArchSpec

_COMMON = dict(q=None, k=None, v=None, mlp_gate=None, norm="layernorm", rotary=False)


def _passes(dropouts: int) -> tuple:
    return (capture_eager_attention, remove_eval_dropout(per_layer=dropouts), hook_embeddings, hook_attention,
            split_fused_qkv, hook_mlp, hook_norms, hook_residual, hook_unembed)


BLOOM = ArchSpec(
    model_types=("bloom",), family="BLOOM", layers="transformer.h", embed="transformer.word_embeddings",
    embed_norm="transformer.word_embeddings_layernorm", final_norm="transformer.ln_f", attn="self_attention",
    o_proj="dense", qkv="query_key_value", qkv_layout="per_head", attn_out_at="self_attention.dense",
    mlp_in="dense_h_to_4h", mlp_out="dense_4h_to_h", mlp_out_at="mlp.dense_4h_to_h", **_COMMON,
    passes=_passes(2), notes="ALiBi (`baddbmm`) inside `hook_attn_scores`; per-head fused `query_key_value`; `word_embeddings_layernorm` as `ln_embed.*`",
)

MPT = ArchSpec(
    model_types=("mpt",), family="MPT", layers="transformer.blocks", embed="transformer.wte",
    final_norm="transformer.norm_f", ln1="norm_1", ln2="norm_2", attn="attn", o_proj="out_proj", qkv="Wqkv",
    mlp="ffn", mlp_in="up_proj", mlp_out="down_proj", mlp_out_at="ffn.down_proj", **_COMMON,
    passes=_passes(2), notes="ALiBi sliced from a `max_seq_len` table (captured for every length); `masked_fill` mask; `clip_qkv` inside `hook_q/k/v`",
)

SPECS = (BLOOM, MPT)
