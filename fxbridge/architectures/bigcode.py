"""GPTBigCode (StarCoder, SantaCoder): fused ``c_attn``, LayerNorm, learned positions, GELU MLP, AttentionInterface.

``multi_query=True`` (MQA, one KV head): ``c_attn`` is [q | k | v] = [D, dh, dh] ("contiguous").
``multi_query=False`` (MHA): HF views ``c_attn``'s output as [B,S,H,3*dh] and splits the last dim, so each head
holds its own q, k, v ("per_head").
"""
from dataclasses import replace

from .gpt2 import GPT2


def _configure(config) -> dict:
    return {"qkv_layout": "contiguous" if config.multi_query else "per_head"}


# Module paths are GPT-2's (GPTBigCode is its descendant); only the fused split's layout differs.
GPT_BIGCODE = replace(
    GPT2,
    model_types=("gpt_bigcode",),
    family="GPTBigCode",
    configure=_configure,
    notes="StarCoder, SantaCoder: `multi_query=True` (MQA) splits `c_attn` contiguous `[D, dh, dh]`, `False` (MHA) per head",
)

SPECS = (GPT_BIGCODE,)
