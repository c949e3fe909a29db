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
clamped SwiGLU (``_apply_gate``), HF's ``@use_experts_implementation`` experts, hooked by the generic ``hook_moe``:
``mlp.hook_router_logits`` [B,S,E] (the biased router linear), ``mlp.hook_expert_indices`` / ``mlp.hook_routing_weights``
[B,S,K] (top-k of the logits, then the softmax over those k values: what the experts receive),
``mlp.hook_expert_out`` [B,S,K,D] (each slot's weighted expert output), ``hook_mlp_out`` the block's output. There is
no softmax over all experts, so no ``mlp.hook_router_probs``, and no dense MLP (no ``mlp.hook_pre`` / ``hook_post``).
"""
from ..passes import hook_mlp
from .moe import _moe
from .spec import DEFAULT_PASSES, ArchSpec

# every layer is an MoE layer (GptOssConfig has no dense layers): no hook_mlp; hook_moe on mlp.router / mlp.experts
GPT_OSS = _moe(
    ("gpt_oss",), "GPT-OSS", router="mlp.router", experts="mlp.experts",
    base=ArchSpec(model_types=("gpt_oss",), family="GPT-OSS", passes=tuple(p for p in DEFAULT_PASSES if p is not hook_mlp)),
    notes="attention sinks: `hook_attn_scores` real keys only, `attn.hook_sink_logits` [H], `hook_pattern` over "
          "the real keys (rows sum < 1); q/k/v/o biases, YaRN rotary, alternating sliding / full layers; MoE with a "
          "biased router and clamped-SwiGLU experts",
)

SPECS = (GPT_OSS,)
