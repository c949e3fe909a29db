"""Post-norm-only blocks (OLMo 2/3, EXAONE 4), VaultGemma's Gemma 2 without post-norms.

OLMo 2 / OLMo 3 / EXAONE 4: no norm before attention or MLP; ``post_attention_layernorm`` and
``post_feedforward_layernorm`` norm the branch outputs before the residual add, so they are ``ln1_post`` /
``ln2_post`` (their outputs are ``hook_attn_out`` / ``hook_mlp_out``, as Gemma 2's sandwich norms) and there are no
``ln1`` / ``ln2`` hooks; ``hook_resid_pre`` is the layer's input (the residual operand of the attention add).
q/k RMSNorms sit between ``hook_q``/``hook_k`` and ``hook_rot_q``/``hook_rot_k`` (OLMo: over the whole projection,
EXAONE 4: per head). OLMo 3 and EXAONE 4 alternate sliding-window and full layers (in the mask); EXAONE 4's full
layers have no rotary when a sliding window is configured (NoPE: no rot hooks there).

VaultGemma: Gemma 2's embedding scale, ``(1 + w)`` norms, ``query_pre_attn_scalar`` and softcaps, with only
``input_layernorm`` (ln1) and ``pre_feedforward_layernorm`` (ln2).
"""
from .gemma import _SANDWICH
from .spec import ArchSpec

_POST_NORM = dict(ln1=None, ln1_post="post_attention_layernorm", ln2=None, ln2_post="post_feedforward_layernorm")


def _exaone4_nope(config) -> dict:
    """HF rotates only on sliding layers when a sliding window is set; otherwise on every layer."""
    if getattr(config, "sliding_window", None) is None:
        return {}
    return dict(nope_layers=tuple(i for i, t in enumerate(config.layer_types) if t != "sliding_attention"))


OLMO2 = ArchSpec(model_types=("olmo2",), family="OLMo 2", **_POST_NORM,
                 notes="post-norm-only blocks (ln1_post/ln2_post); q/k RMSNorm over the whole projection")
OLMO3 = ArchSpec(model_types=("olmo3",), family="OLMo 3", **_POST_NORM,
                 notes="OLMo 2 with alternating sliding-window / full layers")
EXAONE4 = ArchSpec(model_types=("exaone4",), family="EXAONE 4", **_POST_NORM, configure=_exaone4_nope,
                   notes="post-norm-only blocks; per-head q/k RMSNorm; sliding layers rotary, full layers NoPE")
VAULTGEMMA = ArchSpec(model_types=("vaultgemma",), family="VaultGemma",
                      **dict(_SANDWICH, ln1_post=None, ln2_post=None),
                      notes="Gemma 2 without the post-norms: input and pre-feedforward norms only; softcaps")

SPECS = (OLMO2, OLMO3, EXAONE4, VAULTGEMMA)
