"""Falcon: fused ``query_key_value`` in three layouts, inline (eager) attention, RoPE or ALiBi, parallel blocks.

Config flags choose the layout (``_configure``):
- 7B style (``multi_query``, old architecture): [q_0..q_H-1, k, v] -> "contiguous" [H*dh, dh, dh], parallel block
  with one norm (no ln2 hooks), RoPE.
- old MHA / RW (``multi_query=False``, old architecture): HF views [B,S,H,3,dh] -> "per_head"; sequential block with
  ``input_layernorm`` / ``post_attention_layernorm``; RW checkpoints use ALiBi and biases.
- ``new_decoder_architecture`` (40B / 180B): [q x R, k, v] x Hkv -> "per_group"; parallel block with ``ln_attn`` /
  ``ln_mlp``. HF broadcasts K/V to H heads inside ``_split_heads``; hook_k/hook_v sit before that broadcast.
Falcon computes attention inline; ``capture_eager_attention`` turns it into the common attention node. With ALiBi,
HF's eager branch adds the bias to q.k^T *and* (scaled) inside the mask FalconModel builds, its sdpa branch only
through the mask: ``capture_eager_attention(drop_pre_scale_bias=...)`` follows the branch the model is configured
with, so the trace computes what the HF model computes.
"""
from ..passes import (capture_eager_attention, hook_attention, hook_embeddings, hook_mlp, hook_norms, hook_residual,
                      hook_unembed, make_adds_out_of_place, remove_eval_dropout, split_fused_qkv)
from .spec import ArchSpec


def _n_kv_heads(config) -> int:
    if config.new_decoder_architecture:
        return config.num_kv_heads
    return 1 if config.multi_query else config.num_attention_heads


def _passes(parallel: bool, sdpa: bool) -> tuple:
    return (
        capture_eager_attention(drop_pre_scale_bias=sdpa),  # sdpa: HF adds ALiBi only through the mask
        remove_eval_dropout(per_layer=1 if parallel else 2),  # dropout_add after attention (sequential) and MLP
        make_adds_out_of_place(per_layer=1 if parallel else 0),  # parallel: mlp_output += attention_output
        hook_embeddings, hook_attention, split_fused_qkv, hook_mlp, hook_norms, hook_residual, hook_unembed,
    )


def _configure(config) -> dict:
    new_arch = bool(config.new_decoder_architecture)
    parallel = new_arch or bool(config.parallel_attn)
    two_norms = new_arch and config.num_ln_in_parallel_attn in (None, 2)  # HF treats None as 2 on the new arch
    if new_arch:
        layout = "per_group"
    else:
        layout = "contiguous" if config.multi_query else "per_head"
    return {
        "qkv_layout": layout,
        "parallel": parallel,
        "ln1": "ln_attn" if two_norms else "input_layernorm",
        "ln2": "ln_mlp" if two_norms else (None if parallel else "post_attention_layernorm"),
        "rotary": not config.alibi,
        "passes": _passes(parallel, sdpa=config._attn_implementation != "eager"),
    }


FALCON = ArchSpec(
    model_types=("falcon",),
    family="Falcon",
    layers="transformer.h",
    embed="transformer.word_embeddings",
    final_norm="transformer.ln_f",
    attn="self_attention",
    o_proj="dense",
    q=None, k=None, v=None,
    qkv="query_key_value",
    mlp_gate=None,
    mlp_in="dense_h_to_4h",
    mlp_out="dense_4h_to_h",
    norm="layernorm",
    configure=_configure,
    dims_of=lambda config: {"n_kv_heads": _n_kv_heads(config)},
    notes=("all five layouts: 7B (MQA, parallel, RoPE), old MHA (per-head QKV), RW (ALiBi, sequential, biases), "
           "`new_decoder_architecture` with one or several KV heads (per-group `[q×R, k, v]×Hkv`, exact where "
           "TransformerBridge is wrong); inline attention captured; ALiBi inside `hook_attn_scores`"),
    passes=_passes(parallel=False, sdpa=True),  # chosen per config by _configure
)

SPECS = (FALCON,)
