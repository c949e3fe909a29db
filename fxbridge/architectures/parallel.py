"""Parallel-block decoders: attention and MLP both read the layer input (no ``hook_resid_mid``).

- GPT-NeoX (Pythia): fused ``query_key_value`` viewed [B,S,H,3*dh] and chunked ("per_head"), partial rotary,
  LayerNorm; ``use_parallel_residual=False`` makes the block sequential (``_neox``: resid_mid comes back).
- GPT-J: separate q/k/v, interleaved rotary on the first ``rotary_dim`` dims of each head, one ``ln_1`` shared by
  attention and MLP (no ln2 hooks).
- CodeGen: GPT-J's block with one fused ``qkv_proj`` laid out in 4 blocks (HF's ``mp_num``), each [q | v | k] of
  H/4 heads: qkv_layout "blocks:4:qvk".
- Phi: LayerNorm with bias, partial rotary, ``dense`` / ``fc1`` / ``fc2``, optional q/k LayerNorms (between
  ``hook_q``/``hook_k`` and ``hook_rot_q``/``hook_rot_k``).
- Cohere, Cohere 2: a LayerNorm HF writes by hand (mean, variance, (x - mean) * rsqrt(var + eps), weight, no bias;
  ``hook_norms`` recognises it), interleaved rotary, gated MLP, optional q/k norms (Cohere ``use_qk_norm``).
  The logits are ``lm_head(x) * logit_scale``: ``hook_unembed`` is the lm_head output, ``hook_logits`` the scaled
  logits the model returns (``hook_logit_scale``). Cohere 2 alternates sliding-window layers (rotary) and full
  layers without positions (NoPE: no ``hook_rot_q``/``hook_rot_k``).
With transformers releases whose GPT-J / CodeGen attention is written inline (``_attn``, 5.15), the attention is
captured by ``capture_eager_attention`` (CodeGen adds the mask before dividing by sqrt(dh): the mask enters
``hook_attn_scores`` divided too, as HF has it).
"""
from ..passes import (capture_eager_attention, hook_attention, hook_embeddings, hook_logit_scale, hook_mlp,
                      hook_norms, hook_residual, hook_unembed, remove_eval_dropout, split_fused_qkv)
from .spec import DEFAULT_PASSES, ArchSpec

_FUSED = (hook_embeddings, hook_attention, split_fused_qkv, hook_mlp, hook_norms, hook_residual, hook_unembed)


def _inline_attention(module_name: str, cls: str) -> bool:
    """Whether the installed transformers writes this attention inline (an ``_attn`` method) instead of calling
    the AttentionInterface."""
    import importlib
    modeling = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    return hasattr(getattr(modeling, cls), "_attn")


def _gptj_like(module_name: str, cls: str, fused: bool):
    def configure(config) -> dict:
        passes = _FUSED if fused else DEFAULT_PASSES
        if _inline_attention(module_name, cls):
            passes = (capture_eager_attention, *passes)
        return {"passes": passes}
    return configure


def _neox(config) -> dict:
    return {"parallel": bool(config.use_parallel_residual)}


_GPTJ_PATHS = dict(layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f", ln1="ln_1",
                   ln2=None, attn="attn", o_proj="out_proj", mlp_gate=None, mlp_in="fc_in", mlp_out="fc_out",
                   norm="layernorm", parallel=True)

GPT_NEOX = ArchSpec(
    model_types=("gpt_neox",), family="GPT-NeoX",
    layers="gpt_neox.layers", embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm",
    attn="attention", o_proj="dense", q=None, k=None, v=None, qkv="query_key_value", qkv_layout="per_head",
    mlp_gate=None, mlp_in="dense_h_to_4h", mlp_out="dense_4h_to_h", norm="layernorm", parallel=True,
    configure=_neox, passes=(remove_eval_dropout(per_layer=2), *_FUSED),  # post-attention and post-MLP dropout
    notes="fused `query_key_value` split per head; partial rotary (`hook_rot_q/k` are the whole head); eval dropout removed",
)
GPTJ = ArchSpec(
    model_types=("gptj",), family="GPT-J", **_GPTJ_PATHS, configure=_gptj_like("gptj", "GPTJAttention", False),
    notes="interleaved rotary on `rotary_dim` < head dim; one `ln_1` for attention and MLP (no `ln2`); parallel block",
)
CODEGEN = ArchSpec(
    model_types=("codegen",), family="CodeGen", **_GPTJ_PATHS, q=None, k=None, v=None, qkv="qkv_proj",
    qkv_layout="blocks:4:qvk", configure=_gptj_like("codegen", "CodeGenAttention", True), passes=_FUSED,
    notes="GPT-J's block; fused `qkv_proj` in HF's 4 model-parallel blocks of `[q \\| v \\| k]` (layout `blocks:4:qvk`); exact with left padding, where TransformerBridge fails",
)
PHI = ArchSpec(
    model_types=("phi",), family="Phi", final_norm="model.final_layernorm", ln2=None, o_proj="dense", mlp_gate=None,
    mlp_in="fc1", mlp_out="fc2", norm="layernorm", parallel=True,
    notes="partial rotary; LayerNorm with bias; parallel block, one norm; optional q/k LayerNorm (`qk_layernorm`) between `hook_q/k` and `hook_rot_q/k`",
)
_COHERE = dict(ln2=None, norm="layernorm", parallel=True, passes=(*DEFAULT_PASSES, hook_logit_scale))
COHERE = ArchSpec(
    model_types=("cohere",), family="Cohere", **_COHERE,
    notes="hand-written LayerNorm (no bias) hooked as LayerNorm; interleaved rotary; parallel block; optional q/k norms; `hook_unembed` is the lm_head output, `hook_logits` the logits × `logit_scale`",
)
COHERE2 = ArchSpec(
    model_types=("cohere2",), family="Cohere 2", **_COHERE,
    notes="as Cohere, with sliding-window layers (rotary) and full layers without positions (no `hook_rot_q/k` there)",
)

SPECS = (GPT_NEOX, GPTJ, CODEGEN, PHI, COHERE, COHERE2)
