"""Families whose residual branches differ from Llama's: post-norm-only blocks (OLMo 2/3, EXAONE 4), Granite's
multipliers, BitNet's sub-norms, VaultGemma (Gemma 2 without post-norms).

OLMo 2 / OLMo 3 / EXAONE 4: no norm before attention or MLP; ``post_attention_layernorm`` and
``post_feedforward_layernorm`` norm the branch outputs before the residual add, so they are ``ln1_post`` /
``ln2_post`` (their outputs are ``hook_attn_out`` / ``hook_mlp_out``, as Gemma 2's sandwich norms) and there are no
``ln1`` / ``ln2`` hooks; ``hook_resid_pre`` is the layer's input (the residual operand of the attention add).
q/k RMSNorms sit between ``hook_q``/``hook_k`` and ``hook_rot_q``/``hook_rot_k`` (OLMo: over the whole projection,
EXAONE 4: per head). OLMo 3 and EXAONE 4 alternate sliding-window and full layers (in the mask); EXAONE 4's full
layers have no rotary when a sliding window is configured (NoPE: no rot hooks there).

Granite: Llama with four constants. ``embedding_multiplier`` scales the embeddings in the model's forward, outside
the embedding module: ``hook_embed`` is the module output (unscaled: where TransformerBridge's ``embed.hook_out`` sits),
``blocks.0.hook_resid_pre`` the scaled stream. ``attention_multiplier`` is the attention scale (carried by the
attention call, so in ``hook_attn_scores``). ``residual_multiplier`` scales each branch before its residual add:
``hook_attn_out`` / ``hook_mlp_out`` are after it (what is added), ``hook_z`` / ``hook_post`` before.
``logits_scaling`` divides the logits: ``hook_unembed`` is the lm_head output, ``hook_logits`` (``hook_logit_scale``)
the divided logits the model returns.

BitNet (b1.58): Llama with ReLU^2 and a norm in front of each output projection: ``attn_sub_norm`` on the
concatenated heads before ``o_proj`` (hooks ``blocks.{i}.attn.ln_sub.hook_scale`` / ``hook_normalized``, [B,S,D])
and ``ffn_sub_norm`` before ``down_proj`` (``blocks.{i}.mlp.ln_sub.*``, [B,S,F]). ``hook_z`` is the attention
output per head and ``hook_post`` ``act(gate) * up``, both before their sub-norm, so ``hook_z`` does not feed
``o_proj`` directly: zeroing a head there equals zeroing its columns of the sub-norm's input (the norm's scale then
sees the zeros), and the ``attn.o.hook_in`` / ``mlp.out.hook_in`` aliases name these pre-norm points. A model
built from a config has plain ``nn.Linear`` projections; checkpoints' ternary ``AutoBitLinear`` layers come with
a quantization config (``from_pretrained``) and are not covered here.

VaultGemma: Gemma 2's embedding scale, ``(1 + w)`` norms, ``query_pre_attn_scalar`` and softcaps, with only
``input_layernorm`` (ln1) and ``pre_feedforward_layernorm`` (ln2).
"""
from ..passes import (hook_attention, hook_embeddings, hook_logit_scale, hook_mlp, hook_norms, hook_qkv,
                      hook_residual, hook_unembed)
from .gemma import _SANDWICH
from .spec import DEFAULT_PASSES, ArchSpec

_POST_NORM = dict(ln1=None, ln1_post="post_attention_layernorm", ln2=None, ln2_post="post_feedforward_layernorm")


OLMO2 = ArchSpec(model_types=("olmo2",), family="OLMo 2", **_POST_NORM,
                 notes="post-norm-only blocks: no `ln1`/`ln2`; `post_attention_layernorm` / `post_feedforward_layernorm` are `ln1_post` / `ln2_post`, their outputs `hook_attn_out` / `hook_mlp_out`; q/k RMSNorm over the whole projection between `hook_q/k` and `hook_rot_q/k`")
OLMO3 = ArchSpec(model_types=("olmo3",), family="OLMo 3", **_POST_NORM,
                 notes="as OLMo 2, plus alternating sliding-window / full layers with a rotary base per layer type")
EXAONE4 = ArchSpec(model_types=("exaone4",), family="EXAONE 4", **_POST_NORM,
                   notes="post-norm-only blocks as OLMo 2; per-head q/k RMSNorm; with a sliding window the full layers have no rotary (NoPE: no `hook_rot_q/k` there)")
VAULTGEMMA = ArchSpec(model_types=("vaultgemma",), family="VaultGemma",
                      **dict(_SANDWICH, ln1_post=None, ln2_post=None),
                      notes="Gemma 2 without the post-norms (`ln1` = `input_layernorm`, `ln2` = `pre_feedforward_layernorm`); softcaps as Gemma 2")

GRANITE = ArchSpec(model_types=("granite",), family="Granite",
                   passes=(*DEFAULT_PASSES, hook_logit_scale(config_attr="logits_scaling", divide=True)),
                   notes="`embedding_multiplier` after `hook_embed` (in `blocks.0.hook_resid_pre`); `attention_multiplier` is the attention scale; `residual_multiplier` inside `hook_attn_out` / `hook_mlp_out` (what is added); `hook_logits` = `hook_unembed / logits_scaling`")

BITNET = ArchSpec(model_types=("bitnet",), family="BitNet",
                  passes=(hook_embeddings, hook_attention, hook_qkv, hook_mlp(post_input="ffn_sub_norm"),
                          hook_norms(sub_norms=(("attn.ln_sub", "self_attn.attn_sub_norm"),
                                                ("mlp.ln_sub", "mlp.ffn_sub_norm"))),
                          hook_residual, hook_unembed),
                  notes="sub-norms `attn.ln_sub` (between `hook_z` and `o_proj`) and `mlp.ln_sub` (between `hook_post` and `down_proj`); ReLU² gated MLP; checkpoints' ternary `AutoBitLinear` weights not covered (built from config: `nn.Linear`)")

SPECS = (OLMO2, OLMO3, EXAONE4, VAULTGEMMA, GRANITE, BITNET)
