"""DBRX (``DbrxForCausalLM``): fused ``Wqkv`` with ``clip_qkv``, LayerNorms without bias, a top-k MoE on every layer.

Where each DBRX convention is handled:
- Module names: ``transformer.blocks``; per block ``norm_attn_norm.{norm_1, attn, norm_2}`` (the residual add after
  attention sits inside ``norm_attn_norm``) and ``ffn.{router, experts}``.
- ``Wqkv`` is [q | k | v] (GQA, ``kv_n_heads``) clamped to [-clip_qkv, clip_qkv] before HF's split:
  ``split_fused_qkv`` hooks HF's own split, so ``hook_q/k/v`` are after the clamp (as MPT's).
- MoE: router logits -> softmax -> top-k -> weights / their p-norm (``moe_normalize_expert_weights``), then
  ``DbrxExperts``. HF's experts loop over the experts a batch hits (``nonzero``: torch.export cannot capture it);
  during capture they run ``_grouped_experts_forward``, the same per-slot computation written as HF's own
  ``grouped_mm`` experts implementation: sort the slots by expert, grouped matmuls, weight, unsort, sum over K.
  Hooks (``hook_moe``): ``mlp.hook_router_logits``, ``mlp.hook_router_probs`` (the softmax top-k chooses
  from), ``mlp.hook_expert_indices``, ``mlp.hook_routing_weights`` (after the normalisation), ``mlp.hook_expert_out``
  (each slot's expert output times its weight); ``hook_mlp_out`` is the FFN output. No dense MLP, no shared expert.
"""
import torch
from transformers.integrations.moe import _grouped_linear

from ..passes import (hook_attention, hook_embeddings, hook_moe, hook_norms, hook_residual, hook_unembed,
                      remove_eval_dropout, split_fused_qkv)
from .spec import ArchSpec


def _grouped_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """DbrxExperts.forward without its data-dependent loop: HF's values, slot by slot (grouped by expert). Sizes are
    read off the tensors themselves (``unflatten``, ``view_as``): a size computed in one layer would be reused by the
    next in the captured graph, which keeps stitching from treating the layers as independent."""
    d, f, n_experts = self.hidden_size, self.ffn_hidden_size, self.num_experts
    x = hidden_states.reshape(-1, d)
    k = top_k_index.shape[-1]
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    grouped = x[perm // k]
    counts = torch.histc(expert_ids.float() if x.device.type in ("cpu", "mps") else expert_ids.int(),
                         bins=n_experts, min=0, max=n_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    w1, v1, w2 = (p.view(n_experts, f, d) for p in (self.mlp.w1, self.mlp.v1, self.mlp.w2))
    gate = self.mlp.activation_fn(_grouped_linear(grouped, w1, offsets))
    states = _grouped_linear(gate * _grouped_linear(grouped, v1, offsets), w2, offsets, is_transposed=True)
    states = states * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    slots = states[torch.argsort(perm)].unflatten(0, (-1, k))  # each token's K weighted expert outputs [N,K,D]
    return slots.sum(dim=1).view_as(hidden_states)


DBRX = ArchSpec(
    model_types=("dbrx",), family="DBRX", layers="transformer.blocks", embed="transformer.wte",
    final_norm="transformer.norm_f", ln1="norm_attn_norm.norm_1", ln2="norm_attn_norm.norm_2",
    attn="norm_attn_norm.attn", o_proj="out_proj", q=None, k=None, v=None, qkv="Wqkv", mlp="ffn", mlp_gate=None,
    norm="layernorm",
    dims_of=lambda c: {"n_experts": int(c.ffn_config.moe_num_experts), "top_k": int(c.ffn_config.moe_top_k)},
    configure=lambda config: {"moe_layers": tuple(range(config.num_hidden_layers))},  # every layer
    capture_forwards=(("DbrxExperts", _grouped_experts_forward),),
    notes="fused `Wqkv` clamped by `clip_qkv` (inside `hook_q/k/v`); softmax top-k MoE on every layer (`mlp.*`)",
    passes=(remove_eval_dropout(per_layer=2), hook_embeddings, hook_attention, split_fused_qkv, hook_norms,
            hook_moe(router="ffn.router", experts="ffn.experts", probs=True), hook_residual, hook_unembed),
)

SPECS = (DBRX,)
