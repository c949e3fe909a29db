"""GPTBigCode (StarCoder, SantaCoder): fused ``c_attn``, LayerNorm, learned positions, GELU MLP, AttentionInterface.

``multi_query=True`` (MQA, one KV head): ``c_attn`` is [q | k | v] = [D, dh, dh] ("contiguous").
``multi_query=False`` (MHA): HF views ``c_attn``'s output as [B,S,H,3*dh] and splits the last dim, so each head
holds its own q, k, v ("per_head").
"""
from .spec import ArchSpec


def _configure(config) -> dict:
    return {"qkv_layout": "contiguous" if config.multi_query else "per_head"}


GPT_BIGCODE = ArchSpec(
    model_types=("gpt_bigcode",),
    family="GPTBigCode",
    layers="transformer.h",
    embed="transformer.wte",
    pos_embed="transformer.wpe",
    final_norm="transformer.ln_f",
    ln1="ln_1",
    ln2="ln_2",
    attn="attn",
    o_proj="c_proj",
    q=None, k=None, v=None,
    qkv="c_attn",
    mlp_gate=None,
    mlp_in="c_fc",
    mlp_out="c_proj",
    norm="layernorm",
    rotary=False,
    configure=_configure,
    notes="fused c_attn split by layout (MQA contiguous, MHA per head) into hook_q/k/v",
    passes=("hook_embeddings", "hook_attention", "split_fused_qkv", "hook_mlp", "hook_norms", "hook_residual",
            "hook_unembed"),
)

SPECS = (GPT_BIGCODE,)
