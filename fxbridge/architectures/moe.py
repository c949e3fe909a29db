"""Routed mixture-of-experts decoders: a Llama-style block whose MLP is (in some layers) an MoE block.

Every family here runs HF's fused experts (``@use_experts_implementation``), so one pass, ``hook_moe``, hooks them
all: ``mlp.hook_router_logits`` [B,S,E], ``mlp.hook_expert_indices`` / ``mlp.hook_routing_weights`` [B,S,K] (what
the experts receive, after the family's own routing: softmax then top-k and renormalised (Mixtral, Qwen-MoE,
OLMoE), sparsemixer (PhiMoE), sigmoid with a correction bias and group-limited top-k (GLM-4-MoE, MiniMax-M2),
...), ``mlp.hook_expert_out`` [B,S,K,D] (each slot's weighted expert output), ``mlp.hook_shared_out`` (a shared
expert's output as added, after its sigmoid gate ``mlp.hook_shared_gate`` where it has one). ``hook_mlp_out`` is
the whole block's output. A spec says where the MoE modules are; which layers are MoE layers is read from the
config by ``moe_layers_of`` (every convention transformers uses: ``mlp_only_layers`` + ``decoder_sparse_step``,
``first_k_dense_replace``, ``moe_layer_start_index`` / ``moe_layer_end_index`` / ``moe_layer_interval``,
``interleave_moe_layer_step``, ``mlp_layer_types``); dense layers keep ``hook_pre`` / ``hook_post``.
"""
from __future__ import annotations

from dataclasses import replace

from ..passes import hook_logit_scale, hook_moe
from .postnorm import GRANITE, OLMO2
from .spec import DEFAULT_PASSES, ArchSpec

_EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOP_K = ("num_experts_per_tok", "moe_k", "top_k")


def _first(config, names):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def moe_dims(config) -> dict[str, int]:
    """n_experts (E) and top_k (K) under whichever attribute name the family's config uses."""
    n, k = _first(config, _EXPERTS), _first(config, _TOP_K)
    return {"n_experts": n, "top_k": k} if n and k else {}


def moe_layers_of(config) -> tuple[int, ...]:
    """The layers whose MLP is an MoE block, by the conventions of transformers' MoE configs."""
    n = int(config.num_hidden_layers)
    if not moe_dims(config):
        return ()
    types = getattr(config, "mlp_layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == n:
        return tuple(i for i, t in enumerate(types) if "sparse" in str(t) or "moe" in str(t))
    layers = range(n)
    if getattr(config, "first_k_dense_replace", None) is not None:
        layers = [i for i in layers if i >= config.first_k_dense_replace]
    if getattr(config, "moe_layer_start_index", None) is not None:
        end = getattr(config, "moe_layer_end_index", None)
        end = n - 1 if end in (None, -1) else end
        step = getattr(config, "moe_layer_interval", 1) or 1
        layers = [i for i in layers if (i + 1) % step == 0 and config.moe_layer_start_index <= i <= end]
    if getattr(config, "decoder_sparse_step", None):
        only_dense = set(getattr(config, "mlp_only_layers", None) or ())
        layers = [i for i in layers if i not in only_dense and (i + 1) % config.decoder_sparse_step == 0]
    if getattr(config, "interleave_moe_layer_step", None):
        layers = [i for i in layers if (i + 1) % config.interleave_moe_layer_step == 0]
    return tuple(layers)


def _configure(config) -> dict:
    return {"moe_layers": moe_layers_of(config)}


def _moe(model_types, family, *, router="mlp.gate", experts="mlp.experts", shared=None, shared_gate=None,
         base: ArchSpec | None = None, notes="", **fields) -> ArchSpec:
    """A routed-MoE spec: ``base``'s passes (Llama's by default) plus ``hook_moe`` with the family's module names."""
    passes = (base.passes if base is not None else DEFAULT_PASSES)
    moe = hook_moe(router=router, experts=experts, shared=shared, shared_gate=shared_gate)
    spec = base if base is not None else ArchSpec(model_types=model_types, family=family)
    return replace(spec, model_types=model_types, family=family, notes=notes, dims_of=moe_dims, configure=_configure,
                   passes=(*passes, moe), **fields)


MIXTRAL = _moe(("mixtral",), "Mixtral", notes="top-2 of 8 experts (softmax, top-k, renormalised); sliding window "
                                              "in the mask")
QWEN3_MOE = _moe(("qwen3_moe",), "Qwen3-MoE", notes="q/k RMSNorm; `norm_topk_prob`; dense layers by "
                                                    "`mlp_only_layers` / `decoder_sparse_step`")
OLMOE = _moe(("olmoe",), "OLMoE", notes="q/k RMSNorm over all heads; softmax top-k (not renormalised by default)")
FLEX_OLMO = _moe(("flex_olmo",), "FlexOlmo", base=OLMO2,
                 notes="OLMo 2's post-norm-only block with an MoE MLP")
MINIMAX_M2 = _moe(("minimax_m2",), "MiniMax-M2", notes="sigmoid router with a score-correction bias; partial "
                                                       "rotary; q/k RMSNorm over all heads")
PHIMOE = _moe(("phimoe",), "PhiMoE", router="mlp.router", norm="layernorm",
              notes="sparsemixer routing (the weights the experts receive are `hook_routing_weights`); LayerNorm")
QWEN2_MOE = _moe(("qwen2_moe",), "Qwen2-MoE", shared="mlp.shared_expert", shared_gate="mlp.shared_expert_gate",
                 notes="q/k/v biases; a shared expert scaled by its own sigmoid gate (`hook_shared_gate`)")
ERNIE4_5_MOE = _moe(("ernie4_5_moe",), "ERNIE 4.5 MoE", shared="mlp.shared_experts",
                    notes="shared experts; dense layers before `moe_layer_start_index`; router correction bias")
GLM4_MOE = _moe(("glm4_moe",), "GLM-4-MoE", shared="mlp.shared_experts",
                notes="dense first layers (`first_k_dense_replace`); sigmoid group-limited top-k routing with a "
                      "correction bias and `routed_scaling_factor`; shared experts; partial rotary")
GRANITEMOE = _moe(("granitemoe",), "GraniteMoE", base=GRANITE, mlp="block_sparse_moe",
                  router="block_sparse_moe.router", experts="block_sparse_moe.experts",
                  notes="Granite's multipliers (embedding, residual, attention, logits ÷) with an MoE MLP "
                        "(`block_sparse_moe`)")

SPECS = (MIXTRAL, QWEN3_MOE, OLMOE, FLEX_OLMO, MINIMAX_M2, PHIMOE, QWEN2_MOE, ERNIE4_5_MOE, GLM4_MOE, GRANITEMOE)
