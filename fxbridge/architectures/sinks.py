"""Attention sinks: gpt_oss (``GptOssForCausalLM``).

Each attention head has a learned sink logit (``self_attn.sinks`` [H], HF's ``s_aux``): HF appends it to every
softmax row as one more column after the mask and drops that column after the softmax, so a query can put
attention mass on "nothing". fxbridge carries the sinks into the attention call (``tracer/attention_op.py``) and
the ``AttentionCore``: ``hook_attn_scores`` [B,H,S,S] holds the real keys only (q.k^T x scale + mask),
``attn.hook_sink_logits`` [H] the sinks (editable: the edit is the sink value the softmax uses),
``hook_pattern`` [B,H,S,S] the probabilities of the real keys (softmax over [keys, sink], sink column dropped:
rows sum to less than 1), ``hook_z`` pattern @ V. A sink layer always runs the eager math (SDPA has no sink
column; HF's gpt_oss has no sdpa path: eager is HF's own default).

The rest: q/k/v/o biases (inside hook_q/k/v, and o_proj's), YaRN rotary (HF's code in the graph, hook_rot_q/k
after it), alternating sliding-window / full layers (``layer_types``; in each layer's mask). The MLP is a MoE
block: a biased router (top-k of the logits, then softmax over the k values) and experts with biases and a
clamped SwiGLU (``_apply_gate``), HF's ``@use_experts_implementation`` experts.
"""
from ..passes import hook_attention, hook_embeddings, hook_norms, hook_qkv, hook_residual, hook_unembed
from .spec import ArchSpec


def _dims(config) -> dict[str, int]:
    return {"n_experts": int(config.num_local_experts), "top_k": int(config.num_experts_per_tok)}


GPT_OSS = ArchSpec(
    model_types=("gpt_oss",), family="GPT-OSS", mlp_gate=None, mlp_in="experts", mlp_out="experts",
    dims_of=_dims,
    passes=(hook_embeddings, hook_attention, hook_qkv, hook_norms, hook_residual, hook_unembed),
    notes="attention sinks: `hook_attn_scores` real keys only, `attn.hook_sink_logits` [H], `hook_pattern` over "
          "the real keys (rows sum < 1); q/k/v/o biases, YaRN rotary, alternating sliding / full layers; MoE with a "
          "biased router and clamped-SwiGLU experts",
)

SPECS = (GPT_OSS,)
