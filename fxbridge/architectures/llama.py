"""Llama-style decoders: separate q/k/v projections, a pre-norm block, rotary, attention through AttentionInterface.

Most are one line: the paths are Llama's and only the facts that differ are given. The passes read the rest from
the graph: a gated or plain MLP (``mlp_gate=None``), RMSNorm or a ``layer_norm`` call (``norm="layernorm"``;
Nemotron's ``1 + w`` and OLMo's weightless norm are the weights that call receives, after ``hook_normalized``),
q/k norms before RoPE (Qwen3: ``hook_q``/``hook_k`` before them, ``hook_rot_q``/``hook_rot_k`` after norm and RoPE)
or after it (HunYuan: the rot hooks are still what enters the attention product), NoPE layers (SmolLM3: no rot
hooks on layers whose queries are not rotated), biases inside ``hook_q/k/v``, sliding windows in the mask.
"""
from ..passes import hook_final_softcap
from .spec import DEFAULT_PASSES, ArchSpec

_RELU2 = dict(mlp_gate=None)  # non-gated MLP: up_proj -> act -> down_proj (hook_pre, hook_post)

LLAMA = ArchSpec(model_types=("llama", "exaone", "internlm3"), family="Llama",
                 notes="GQA, gated SiLU MLP; exaone and internlm3 are LlamaForCausalLM under their own model_type")
MISTRAL = ArchSpec(model_types=("mistral",), family="Mistral", notes="sliding-window attention (in the mask)")
QWEN2 = ArchSpec(model_types=("qwen2",), family="Qwen2", notes="q/k/v biases (inside `hook_q/k/v`)")
QWEN3 = ArchSpec(model_types=("qwen3",), family="Qwen3", notes="q/k RMSNorm between `hook_q/k` and `hook_rot_q/k`")
MINISTRAL = ArchSpec(model_types=("ministral", "ministral3"), family="Ministral",
                     notes="sliding / full layers (in the mask); Ministral 3: YaRN rotary")
HELIUM = ArchSpec(model_types=("helium",), family="Helium")
SEED_OSS = ArchSpec(model_types=("seed_oss",), family="Seed-OSS", notes="q/k/v biases (inside `hook_q/k/v`)")
ERNIE4_5 = ArchSpec(model_types=("ernie4_5",), family="ERNIE 4.5")
SMOLLM3 = ArchSpec(model_types=("smollm3",), family="SmolLM3", notes="NoPE layers (no_rope_layers): no rot hooks there")
HUNYUAN = ArchSpec(model_types=("hunyuan_v1_dense",), family="HunYuan (dense)",
                   notes="q/k norms after RoPE: hook_rot_q/k after both")
JAIS2 = ArchSpec(model_types=("jais2",), family="Jais 2", norm="layernorm", **_RELU2,
                 notes="LayerNorm with bias; ReLU^2 MLP, not gated")
NANOCHAT = ArchSpec(model_types=("nanochat",), family="nanochat", mlp_gate=None, mlp_in="fc1", mlp_out="fc2",
                    final_softcap_config="final_logit_softcapping", passes=(*DEFAULT_PASSES, hook_final_softcap),
                    notes="q/k RMSNorm before RoPE; ReLU^2 MLP fc1/fc2, not gated; `model.norm` also normalises the "
                          "embeddings (`ln_final` is its last call); final softcap (`hook_logits`)")
APERTUS = ArchSpec(model_types=("apertus",), family="Apertus", ln1="attention_layernorm", ln2="feedforward_layernorm",
                   **_RELU2, notes="xIELU MLP, not gated; q/k RMSNorm")
ARCEE = ArchSpec(model_types=("arcee",), family="Arcee", **_RELU2, notes="ReLU^2 MLP, not gated")
NEMOTRON = ArchSpec(model_types=("nemotron",), family="Nemotron", norm="layernorm", **_RELU2,
                    notes="LayerNorm1P ((1 + w) after hook_normalized); ReLU^2 MLP; partial rotary")
OLMO = ArchSpec(model_types=("olmo",), family="OLMo", norm="layernorm",
                notes="non-parametric LayerNorm (no weight or bias); optional q/k/v clipping inside hook_q/k/v")

SPECS = (LLAMA, MISTRAL, QWEN2, QWEN3, MINISTRAL, HELIUM, SEED_OSS, ERNIE4_5, SMOLLM3, HUNYUAN, JAIS2, NANOCHAT,
         APERTUS, ARCEE, NEMOTRON, OLMO)
