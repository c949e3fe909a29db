"""Gemma 1, 2 and 3 (text): Llama-like decoders with Gemma's conventions.

All three: the token embedding is ``x sqrt(D)`` inside HF's ScaledWordEmbedding (``hook_embed`` is after the
scaling); RMSNorm computes in float32 and multiplies by ``(1 + w)`` after ``hook_normalized``; GeGLU MLP.
Gemma 2/3 add sandwich norms -- HF's ``post_attention_layernorm`` is ``ln1_post`` (its output is
``hook_attn_out``), ``pre_feedforward_layernorm`` is ``ln2``, ``post_feedforward_layernorm`` is ``ln2_post``
(``hook_mlp_out``) -- ``query_pre_attn_scalar`` as the attention scale and alternating sliding-window / global
layers (both carried by the captured attention call and its mask), and optional softcaps: attention
(``attn_logit_softcapping``, inside the attention core) and final logits (``final_logit_softcapping``, the
``hook_final_softcap`` pass). Gemma 3 adds q/k RMSNorms (between ``hook_q``/``hook_k`` and ``hook_rot_q``/
``hook_rot_k``) and a rotary base per layer type (local / global).
"""
from ..passes import hook_final_softcap
from .spec import DEFAULT_PASSES, ArchSpec

_SANDWICH = dict(
    ln1="input_layernorm",
    ln1_post="post_attention_layernorm",
    ln2="pre_feedforward_layernorm",
    ln2_post="post_feedforward_layernorm",
    final_softcap_config="final_logit_softcapping",
    passes=(*DEFAULT_PASSES, hook_final_softcap),
)

GEMMA = ArchSpec(model_types=("gemma",), family="Gemma",
                 notes="`hook_embed` already × √D; RMSNorm (1 + w) after `hook_normalized`; GeGLU")
GEMMA2 = ArchSpec(model_types=("gemma2",), family="Gemma 2", **_SANDWICH,
                  notes="sandwich norms (`ln1_post`, `ln2_post`); `query_pre_attn_scalar`; alternating sliding/global layers; attention softcap (`hook_attn_scores_pre_cap`) and final softcap (`hook_logits`)")
GEMMA3_TEXT = ArchSpec(model_types=("gemma3_text",), family="Gemma 3 (text)", **_SANDWICH,
                       notes="as Gemma 2, plus q/k norms and a rotary base per layer type; HF never applies its attention softcap, nor does fxbridge")

SPECS = (GEMMA, GEMMA2, GEMMA3_TEXT)
