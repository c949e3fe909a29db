"""Absolute-position families: OPT, XGLM, GPT-Neo, OpenAI GPT (learned or sinusoidal positions, LayerNorm).

- Positions are HF's own code in the graph, so left padding gives what HF gives: OPT's come from the mask,
  ``cumsum(mask) * mask - 1`` (+ offset 2); XGLM (transformers 5.x), GPT-Neo and OpenAI GPT number them
  ``arange(S)`` whatever the mask. ``hook_pos_embed`` is the position module's output ([B,S,D]).
- XGLM scales the token embedding by sqrt(d_model) inside ``XGLMScaledWordEmbedding``: ``hook_embed`` is that
  module's output, already scaled (as Gemma). Its sinusoidal table is a buffer, hooked as ``hook_pos_embed``.
- GPT-Neo and XGLM compute attention inline: ``capture_eager_attention`` reads GPT-Neo's unscaled q.kᵀ with the
  causal / local-window mask ``where(bias[..], s, finfo.min)`` and XGLM's flattened [B*H,S,S] ``bmm``.
  GPT-Neo's local layers (``attention_types``) keep their windowed bias buffer inside the mask.
- OPT and XGLM keep ``fc1`` / ``fc2`` on the decoder layer (``mlp=None``): ``hook_mlp_out`` is fc2's output.
  OPT calls its MLP on [B*S,D] (a reshape in the layer): the ln2 / mlp hooks see [B*S,..] flattened.
- Post-LN blocks (OpenAI GPT; OPT with ``do_layer_norm_before=False``) normalise after each residual add, as
  TransformerLens's BERT block: ``resid_mid = resid_pre + attn_out`` (before the norm), ``ln1`` normalises it and
  its output is what the MLP reads and is added to, ``ln2`` normalises ``ln1_out + mlp_out`` and
  ``resid_post`` is the layer output, after ln2 (TransformerLens's ``hook_normalized_resid_post``). No final norm.
- OPT ``word_embed_proj_dim != hidden_size`` (OPT-350m): ``hook_embed`` is ``project_in``'s output (the [B,S,D]
  token embedding entering the residual stream); ``project_out`` runs between the last layer and ``lm_head``.
"""
from ..passes import (capture_eager_attention, hook_attention, hook_embeddings, hook_mlp, hook_norms, hook_qkv,
                      hook_residual, hook_unembed, remove_eval_dropout, split_fused_qkv, unflatten_token_rows)
from .spec import ArchSpec

_INLINE = (capture_eager_attention, hook_embeddings, hook_attention, hook_qkv, hook_mlp, hook_norms, hook_residual,
           hook_unembed)
_LATE = (hook_embeddings, hook_attention, hook_qkv, hook_mlp, hook_norms, hook_residual, hook_unembed)
_FAIRSEQ = dict(q="q_proj", k="k_proj", v="v_proj", o_proj="out_proj", mlp=None, mlp_gate=None, mlp_in="fc1",
                mlp_out="fc2", ln1="self_attn_layer_norm", ln2="final_layer_norm", norm="layernorm", rotary=False)


def _opt(config) -> dict:
    pre_ln = bool(config.do_layer_norm_before)
    projected = config.word_embed_proj_dim != config.hidden_size
    return {"final_norm": "model.decoder.final_layer_norm" if pre_ln and not config._remove_final_layer_norm
            else None, "embed": "model.decoder.project_in" if projected else "model.decoder.embed_tokens"}


OPT = ArchSpec(
    model_types=("opt",), family="OPT", layers="model.decoder.layers", embed="model.decoder.embed_tokens",
    pos_embed="model.decoder.embed_positions", final_norm="model.decoder.final_layer_norm", **_FAIRSEQ,
    configure=_opt, notes="positions from the attention mask (offset 2, exact under left padding); `fc1`/`fc2` on the layer; MLP rows HF flattens to [B*S,D] hooked as [B,S,..]; post-LN: `resid_mid` before ln1, `resid_post` the layer output, no `ln_final`; 350m: `hook_embed` is `project_in`'s output",
    passes=(remove_eval_dropout(per_layer=2), unflatten_token_rows, *_LATE),
)

XGLM = ArchSpec(
    model_types=("xglm",), family="XGLM", layers="model.layers", embed="model.embed_tokens",
    pos_embed="model.embed_positions", final_norm="model.layer_norm", **_FAIRSEQ,
    passes=(capture_eager_attention, remove_eval_dropout(per_layer=3), *_LATE),
    notes="`hook_embed` already × √D (inside `XGLMScaledWordEmbedding`); sinusoidal `hook_pos_embed`; inline [B*H,S,S] attention captured",
)

GPT_NEO = ArchSpec(
    model_types=("gpt_neo",), family="GPT-Neo", layers="transformer.h", embed="transformer.wte",
    pos_embed="transformer.wpe", final_norm="transformer.ln_f", ln1="ln_1", ln2="ln_2", attn="attn.attention",
    o_proj="out_proj", mlp_gate=None, mlp_in="c_fc", mlp_out="c_proj", norm="layernorm", rotary=False,
    passes=_INLINE, notes="unscaled inline attention captured; local (windowed) layers from `attention_types` carried by the mask",
)

OPENAI_GPT = ArchSpec(
    model_types=("openai-gpt",), family="OpenAI GPT", layers="transformer.h", embed="transformer.tokens_embed",
    pos_embed="transformer.positions_embed", final_norm=None, ln1="ln_1", ln2="ln_2", attn="attn",
    o_proj="c_proj", q=None, k=None, v=None, qkv="c_attn", mlp_gate=None, mlp_in="c_fc", mlp_out="c_proj",
    norm="layernorm", rotary=False,
    passes=(capture_eager_attention, hook_embeddings, hook_attention, split_fused_qkv, hook_mlp, hook_norms,
            hook_residual, hook_unembed),
    notes="post-LN blocks (`resid_mid = resid_pre + attn_out` before `ln_1`, `resid_post` after `ln_2`), no final norm; its `s·b − 1e4·(1−b)` causal mask read as −inf entries",
)

SPECS = (OPT, XGLM, GPT_NEO, OPENAI_GPT)
