"""Fused gate/up MLP decoders: Phi-3, GLM, GLM-4.

HF's ``gate_up_proj`` computes [gate | up] in one Linear and ``chunk(2, -1)``s it; with ``mlp_gate`` and
``mlp_in`` naming that one module, ``hook_mlp`` hooks the two halves of HF's chunk: ``hook_pre`` the gate half,
``hook_pre_linear`` the up half ([B,S,F] each, views of the fused output), ``hook_post`` the input of
``down_proj``.
- Phi-3: fused ``qkv_proj`` [q | k | v] ("contiguous", GQA), partial rotary where configured; the eval-mode
  ``resid_attn_dropout`` / ``resid_mlp_dropout`` between the branches and the residual adds are removed.
- GLM: separate q/k/v with biases, partial rotary (``partial_rotary_factor`` 0.5) on interleaved pairs (HF's
  ``rotate_half`` on even/odd lanes); ``hook_rot_q/k`` are the full head vectors.
- GLM-4: GLM plus sandwich norms: ``post_self_attn_layernorm`` is ``ln1_post`` (its output is ``hook_attn_out``),
  ``post_attention_layernorm`` is ``ln2``, ``post_mlp_layernorm`` is ``ln2_post`` (``hook_mlp_out``).
"""
from ..passes import (hook_attention, hook_embeddings, hook_mlp, hook_norms, hook_residual, hook_unembed,
                      remove_eval_dropout, split_fused_qkv)
from .spec import ArchSpec

_GATE_UP = dict(mlp_gate="gate_up_proj", mlp_in="gate_up_proj")

PHI3 = ArchSpec(
    model_types=("phi3",), family="Phi-3", q=None, k=None, v=None, qkv="qkv_proj", qkv_layout="contiguous",
    **_GATE_UP, notes=("fused `qkv_proj` `[q|k|v]` (GQA) split into `hook_q/k/v`; fused `gate_up_proj`: `hook_pre` / "
           "`hook_pre_linear` are its gate / up halves; partial rotary where configured"),
    passes=(remove_eval_dropout(per_layer=2), hook_embeddings, hook_attention, split_fused_qkv, hook_mlp, hook_norms,
            hook_residual, hook_unembed),
)
GLM = ArchSpec(model_types=("glm",), family="GLM", **_GATE_UP,
               notes="fused `gate_up_proj` as Phi-3; partial rotary on interleaved lanes (`hook_rot_q/k` full head vectors); q/k/v biases")
GLM4 = ArchSpec(model_types=("glm4",), family="GLM-4", **_GATE_UP, ln1_post="post_self_attn_layernorm",
                ln2_post="post_mlp_layernorm",
                notes=("GLM plus sandwich norms: `post_self_attn_layernorm` (`ln1_post`, output `hook_attn_out`), "
                       "`post_mlp_layernorm` (`ln2_post`, output `hook_mlp_out`)"))

SPECS = (PHI3, GLM, GLM4)
