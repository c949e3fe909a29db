"""The hook contract as data: every hook point's name, symbolic shape and TransformerBridge aliases, in one table.

``HOOKS`` has one ``HookDef`` per row of HOOKS.md (and of the README's "hooks beyond the common table"). Everything
that needs a hook's name, shape or aliases reads it from here:
- ``hook_name("attn.hook_q", layer=3)`` -> ``"blocks.3.attn.hook_q"`` (passes, ``stop_at_layer``, ``verify``);
- ``shape_of(name)`` -> ``("B", "S", "H", "dh")`` (the hook points, so the hook table and exports);
- ``aliases_for(names)`` -> ``{alias: canonical}`` for the hook points a traced module has (``gm.resolve``, the
  cache, ``names_filter``);
- ``get_act_name("pattern", 3)`` (TransformerLens's shorthand, also behind ``cache["pattern", 3]``).

Templates use ``{i}`` for the layer index. An alias may depend on a sibling point: TransformerBridge calls a gated
MLP's gate output ``mlp.gate.hook_out`` and its up projection ``mlp.in.hook_out``, while on a plain MLP
``mlp.in.hook_out`` is the input projection (``hook_pre``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

LAYER = "{i}"


@dataclass(frozen=True)
class Alias:
    """Another spelling of a hook point; ``if_present`` / ``if_absent`` name a sibling template it depends on."""

    template: str
    if_present: str | None = None
    if_absent: str | None = None


@dataclass(frozen=True)
class HookDef:
    template: str  # "blocks.{i}.attn.hook_q"
    shape: tuple[str, ...]  # symbolic dims: B S D H Hkv dh F V E K P 1
    aliases: tuple[Alias, ...] = ()
    doc: str = ""

    @property
    def per_layer(self) -> bool:
        return LAYER in self.template


def _a(*templates: str) -> tuple[Alias, ...]:
    return tuple(Alias(t) for t in templates)


_B = "blocks.{i}."
_RES = ("B", "S", "D")
_SCALE, _NORMED = ("B", "S", "1"), ("B", "S", "D")
_SCORES = ("B", "H", "S", "S")
_GEMMA4 = _B + "hook_moe_out"  # the MoE branch of a layer that also has a dense MLP

HOOKS: tuple[HookDef, ...] = (
    HookDef("hook_embed", _RES, doc="token embedding output"),
    HookDef("hook_pos_embed", _RES, doc="learned absolute position embeddings"),
    HookDef("ln_embed.hook_scale", _SCALE, doc="norm of the embeddings before layer 0 (Bloom)"),
    HookDef("ln_embed.hook_normalized", _NORMED, doc="norm of the embeddings before layer 0 (Bloom)"),
    HookDef(_B + "hook_resid_pre", _RES, _a(_B + "hook_in"), "residual stream entering layer i"),
    HookDef(_B + "ln1.hook_scale", _SCALE, doc="sqrt(mean(x_c^2)+eps) of the pre-attention norm"),
    HookDef(_B + "ln1.hook_normalized", _NORMED, doc="x_c / scale, before weight and bias"),
    HookDef(_B + "attn.hook_q", ("B", "S", "H", "dh"), _a(_B + "attn.q.hook_out"), "query projection output"),
    HookDef(_B + "attn.hook_k", ("B", "S", "Hkv", "dh"), _a(_B + "attn.k.hook_out"), "key projection output"),
    HookDef(_B + "attn.hook_v", ("B", "S", "Hkv", "dh"), _a(_B + "attn.v.hook_out"), "value projection output"),
    HookDef(_B + "attn.hook_rot_q", ("B", "S", "H", "dh"), doc="query after q-norm and rotary"),
    HookDef(_B + "attn.hook_rot_k", ("B", "S", "Hkv", "dh"), doc="key after k-norm and rotary"),
    HookDef(_B + "attn.hook_attn_scores_pre_cap", _SCORES, doc="q.k^T x scale before the score softcap"),
    HookDef(_B + "attn.hook_attn_scores", _SCORES, doc="scores (-> softcap) + mask, before softmax"),
    HookDef(_B + "attn.hook_pattern", _SCORES, doc="softmax output"),
    HookDef(_B + "attn.hook_z", ("B", "S", "H", "dh"), _a(_B + "attn.o.hook_in"), "pattern @ V per head"),
    HookDef(_B + "attn.hook_result", ("B", "S", "H", "D"), doc="per-head z_h @ W_O[h] (use_attn_result)"),
    HookDef(_B + "attn.ln_sub.hook_scale", _SCALE, doc="attention sub-norm between hook_z and W_O (BitNet)"),
    HookDef(_B + "attn.ln_sub.hook_normalized", _NORMED, doc="attention sub-norm between hook_z and W_O (BitNet)"),
    HookDef(_B + "hook_attn_out", _RES, _a(_B + "attn.hook_out"), "attention output added to the residual"),
    HookDef(_B + "ln1_post.hook_scale", _SCALE, doc="post-attention norm (sandwich norms)"),
    HookDef(_B + "ln1_post.hook_normalized", _NORMED, doc="post-attention norm (sandwich norms)"),
    HookDef(_B + "hook_resid_mid", _RES, doc="resid_pre + attn_out (sequential blocks)"),
    HookDef(_B + "ln2.hook_scale", _SCALE, doc="the pre-MLP norm"),
    HookDef(_B + "ln2.hook_normalized", _NORMED, doc="the pre-MLP norm"),
    HookDef(_B + "mlp.hook_pre", ("B", "S", "F"),
            (Alias(_B + "mlp.gate.hook_out", if_present=_B + "mlp.hook_pre_linear"),
             Alias(_B + "mlp.in.hook_out", if_absent=_B + "mlp.hook_pre_linear")),
            "input projection (gated MLPs: the gate projection) output"),
    HookDef(_B + "mlp.hook_pre_linear", ("B", "S", "F"), _a(_B + "mlp.in.hook_out"), "gated MLPs: up projection"),
    HookDef(_B + "mlp.hook_post", ("B", "S", "F"), _a(_B + "mlp.out.hook_in"), "input of the down projection"),
    HookDef(_B + "mlp.ln_sub.hook_scale", _SCALE, doc="MLP sub-norm between hook_post and W_out (BitNet)"),
    HookDef(_B + "mlp.ln_sub.hook_normalized", ("B", "S", "F"),
            doc="MLP sub-norm between hook_post and W_out (BitNet)"),
    HookDef(_B + "ln2_post.hook_scale", _SCALE, doc="post-MLP norm (sandwich norms)"),
    HookDef(_B + "ln2_post.hook_normalized", _NORMED, doc="post-MLP norm (sandwich norms)"),
    HookDef(_B + "hook_mlp_out", _RES, _a(_B + "mlp.hook_out"), "MLP output added to the residual"),
    # Mixture-of-experts layers (N = B*S tokens flattened by HF are seen as [B,S,...]). Gemma 4 runs its MoE next to
    # a dense MLP: its old ``moe.*`` names stay as aliases there (where ``hook_moe_out`` exists).
    HookDef(_B + "mlp.hook_router_logits", ("B", "S", "E"), (Alias(_B + "moe.hook_router_logits", if_present=_GEMMA4),),
            "router logits, before softmax / sigmoid"),
    HookDef(_B + "mlp.hook_router_probs", ("B", "S", "E"), (Alias(_B + "moe.hook_expert_weights", if_present=_GEMMA4),),
            "the router scores top-k chooses from (softmax / sigmoid of the logits)"),
    HookDef(_B + "mlp.hook_expert_indices", ("B", "S", "K"),
            (Alias(_B + "moe.hook_expert_indices", if_present=_GEMMA4),), "chosen experts (int64)"),
    HookDef(_B + "mlp.hook_routing_weights", ("B", "S", "K"),
            (Alias(_B + "moe.hook_routing_weights", if_present=_GEMMA4), Alias(_B + "mlp.hook_expert_weights")),
            "the chosen experts' weights as the experts use them (after the family's normalisation)"),
    HookDef(_B + "mlp.hook_expert_out", ("B", "S", "K", "D"), (Alias(_B + "moe.hook_expert_out", if_present=_GEMMA4),),
            "each chosen slot's weighted expert output (the slots sum to the routed output)"),
    HookDef(_B + "mlp.hook_shared_gate", ("B", "S", "1"), doc="the shared expert's gate, after its sigmoid"),
    HookDef(_B + "mlp.hook_shared_out", _RES, doc="the shared experts' output as added to the routed output"),
    # -- MLA rows (deepseek) --
    # Multi-head latent attention (DeepSeek V2/V3): the compressed latents after their norms and the one rotary key
    # all heads share. hook_q/hook_k/hook_v/hook_rot_q/hook_rot_k keep the rows above (dh: the q/k head; MLA's
    # hook_k holds the per-head non-rotary part, hook_v / hook_z the value head, see docs).
    HookDef(_B + "attn.hook_q_latent", ("B", "S", "Rq"), _a(_B + "attn.q_a_layernorm.hook_out"),
            "MLA: the query latent, q_a_layernorm's output (only with a query LoRA)"),
    HookDef(_B + "attn.hook_kv_latent", ("B", "S", "Rkv"), _a(_B + "attn.kv_a_layernorm.hook_out"),
            "MLA: the key/value latent, kv_a_layernorm's output"),
    HookDef(_B + "attn.hook_k_rope", ("B", "S", "1", "dr"),
            doc="MLA: the rotary key part shared by all heads, after RoPE"),
    # -- attention-sink rows (gpt_oss) --
    HookDef(_B + "attn.hook_sink_logits", ("H",),
            doc="the learned sink logit of each head (gpt_oss `sinks`): one more softmax column, dropped after it"),
    # -- differential-attention / mixture-of-attention rows (diffllama, jetmoe) --
    # DiffLlama: hook_attn_scores / hook_pattern [B,H,S,S] hold both maps (differential head j: heads j and j+H/2)
    HookDef(_B + "attn.hook_lambda", ("1",), doc="differential attention: lambda = exp(q1.k1) - exp(q2.k2) + lambda_init"),
    HookDef(_B + "attn.hook_diff_pattern", ("B", "H/2", "S", "S"),
            doc="differential attention: pattern[:, j] - lambda * pattern[:, j + H/2], the map each head applies"),
    HookDef(_B + "attn.hook_diff", ("B", "S", "H/2", "2dh"),
            doc="differential attention: diff_pattern @ [v1|v2] per differential head, before the group norm"),
    # JetMoE's mixture of attention heads: a router picks K query/output expert pairs per token (H = K * Hkv)
    HookDef(_B + "attn.hook_router_logits", ("B", "S", "E"), _a(_B + "attn.experts.router.hook_out"),
            "attention router logits (mixture of attention heads)"),
    HookDef(_B + "attn.hook_expert_indices", ("B", "S", "K"), doc="attention experts chosen per token (int64)"),
    HookDef(_B + "attn.hook_routing_weights", ("B", "S", "K"),
            doc="softmax over the chosen attention experts' logits; scales each slot's output projection"),
    HookDef(_B + "attn.hook_expert_out", ("B", "S", "K", "D"),
            doc="each attention slot's weighted output projection (the slots sum to hook_attn_out - bias)"),
    # -- llama4 / dbrx rows --
    HookDef(_B + "hook_moe_out", _RES, doc="the MoE branch added to the residual"),
    HookDef(_B + "ple.hook_per_layer_input", ("B", "S", "P"), doc="the layer's per-layer input"),
    HookDef(_B + "ple.hook_gate", ("B", "S", "P"), doc="per-layer input gate before the activation"),
    HookDef(_B + "ple.hook_gated", ("B", "S", "P"), doc="act(gate) x per-layer input"),
    HookDef(_B + "hook_ple_out", _RES, doc="the per-layer-embedding branch added to the residual"),
    HookDef(_B + "hook_resid_post", _RES, _a(_B + "hook_out"), "the decoder layer's output"),
    HookDef("ln_final.hook_scale", _SCALE, doc="final norm"),
    HookDef("ln_final.hook_normalized", _NORMED, doc="final norm"),
    HookDef("hook_unembed", ("B", "S", "V"), _a("unembed.hook_out"), "lm_head output, before a final softcap"),
    HookDef("hook_logits", ("B", "S", "V"),
            doc="cap * tanh(hook_unembed / cap), Granite hook_unembed / logits_scaling: what the module returns"),
)

_BY_TEMPLATE = {h.template: h for h in HOOKS}
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


def template_of(name: str) -> tuple[str, int | None]:
    """``"blocks.3.attn.hook_q"`` -> ``("blocks.{i}.attn.hook_q", 3)``; names outside blocks have layer None."""
    m = _LAYER_RE.match(name)
    if m is None:
        return name, None
    return "blocks.{i}." + name[m.end():], int(m.group(1))


def hook_def(name: str) -> HookDef | None:
    """The table row of a concrete hook name, or None for a name the contract does not know."""
    return _BY_TEMPLATE.get(template_of(name)[0])


def hook_name(short: str, layer: int | None = None) -> str:
    """The canonical name of a table entry: ``hook_name("attn.hook_q", 3)`` / ``hook_name("hook_embed")``."""
    template = ("blocks.{i}." + short) if layer is not None and not short.startswith("blocks.") else short
    if template not in _BY_TEMPLATE:
        if layer is None and "blocks.{i}." + short in _BY_TEMPLATE:
            raise ValueError(f"{short!r} is a per-layer hook: it needs a layer index")
        raise KeyError(f"{short!r} is not in the hook table (fxbridge/runtime/names.py)")
    if _BY_TEMPLATE[template].per_layer != (layer is not None):
        raise ValueError(f"{template!r} {'needs' if layer is None else 'takes no'} a layer index")
    return template.replace(LAYER, str(layer)) if layer is not None else template


def shape_of(name: str) -> tuple[str, ...] | None:
    row = hook_def(name)
    return row.shape if row is not None else None


def aliases_for(names) -> dict[str, str]:
    """``{alias: canonical}`` for the hook points ``names`` (a traced module's hook_dict), from the table."""
    present = set(names)
    out: dict[str, str] = {}
    for name in present:
        template, layer = template_of(name)
        row = _BY_TEMPLATE.get(template)
        if row is None:
            continue
        fill = (lambda t: t.replace(LAYER, str(layer))) if layer is not None else (lambda t: t)
        for alias in row.aliases:
            if alias.if_present is not None and fill(alias.if_present) not in present:
                continue
            if alias.if_absent is not None and fill(alias.if_absent) in present:
                continue
            spelled = fill(alias.template)
            if spelled not in present:
                out[spelled] = name
    return dict(sorted(out.items()))


# TransformerLens's get_act_name shorthand: short name -> table template
_ACT_ALIASES = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
                "mlp_pre": "pre", "mlp_post": "post"}
_LAYER_TYPE_ALIASES = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}


def _act_groups() -> dict[str, str]:
    """Short activation name -> the sub-module it lives in ("q" -> "attn", "pre" -> "mlp"), read from the table."""
    groups: dict[str, str] = {}
    for row in HOOKS:
        parts = row.template.split(".")
        if row.per_layer and len(parts) == 4 and parts[2] in ("attn", "mlp"):
            groups.setdefault(parts[3][len("hook_"):], parts[2])
    return groups


_GROUPS = _act_groups()
_NORM_ACTS = {"scale", "normalized"}


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """TransformerLens's ``utils.get_act_name``: ("pattern", 3) -> "blocks.3.attn.hook_pattern"."""
    if ("." in name or name.startswith("hook_")) and layer is None:
        return name
    name = _ACT_ALIASES.get(name, name)
    full = f"blocks.{layer}." if layer is not None else ""
    if name in _GROUPS:
        layer_type = _GROUPS[name]
    elif layer_type in _LAYER_TYPE_ALIASES:
        layer_type = _LAYER_TYPE_ALIASES[layer_type]
    if layer_type:
        full += f"{layer_type}."
    full += f"hook_{name}"
    if name in _NORM_ACTS and layer is None:
        full = f"ln_final.{full}"
    return full
