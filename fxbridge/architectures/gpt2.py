"""GPT-2: Conv1D projections, fused ``c_attn`` ([q | k | v] contiguous), LayerNorm, learned positions, GELU MLP."""
from ..passes import hook_attention, hook_embeddings, hook_mlp, hook_norms, hook_residual, hook_unembed, split_fused_qkv
from .spec import ArchSpec

GPT2 = ArchSpec(
    model_types=("gpt2",),
    family="GPT-2",
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
    qkv_layout="contiguous",
    mlp_gate=None,
    mlp_in="c_fc",
    mlp_out="c_proj",
    norm="layernorm",
    rotary=False,
    notes="Conv1D fused `c_attn` split into `hook_q/k/v`; `hook_pos_embed`",
    passes=(hook_embeddings, hook_attention, split_fused_qkv, hook_mlp, hook_norms, hook_residual, hook_unembed),
)

SPECS = (GPT2,)
