"""ActivationCache: name -> tensor, with TransformerLens's shorthand keys (``cache["pattern", 3]``, ``cache["embed"]``)
and legacy TransformerLens's analysis methods (``accumulated_resid``, ``decompose_resid``, ``stack_head_results``,
``apply_ln_to_stack``, ``logit_attrs`` ...), same labels and semantics.

Norms: ``apply_ln_to_stack`` centres (LayerNorm models only) and divides by the cached ``hook_scale``, as
TransformerLens does; it never multiplies by the norm weight. fxbridge's weights are unprocessed (TransformerLens's
``from_pretrained_no_processing``): a direct logit attribution ``logit_attrs`` sums to the logit difference only
once the final norm's weight (Gemma: ``1 + w``) and bias are folded into the directions by the caller.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from ..errors import UsageError, unknown_hook_error
from .names import get_act_name


def slice_dim(x: torch.Tensor, s, dim: int) -> torch.Tensor:
    """TransformerLens's ``Slice``: None keeps all, an int selects (dropping the dim), a tuple is ``slice(*s)``, a
    slice slices, a list / tensor of indices index-selects."""
    if s is None:
        return x
    if isinstance(s, tuple):
        s = slice(*s)
    if isinstance(s, int):
        return x.select(dim, s)
    if isinstance(s, slice):
        index = [slice(None)] * x.dim()
        index[dim] = s
        return x[tuple(index)]
    return x.index_select(dim, torch.as_tensor(s, device=x.device))


class ResidAnalysis:
    """Legacy TransformerLens ``ActivationCache`` analysis methods; they read the cache and ``self.model``'s weights."""

    def _model(self):
        if self.model is None:
            raise UsageError("this cache has no model; the analysis methods read its weights and norms: "
                             "use gm.run_with_cache(...) or ActivationCache(..., model=gm)")
        return self.model

    def _need(self, key, purpose: str) -> torch.Tensor:
        """The cached activation ``key``, or a KeyError naming the hook to cache (or why the model has none)."""
        if key in self:
            return self[key]
        name = self._key(key)
        model = self.model
        if model is not None and name not in model.hook_dict:
            why = (" (parallel blocks: attention and MLP both read resid_pre, there is no resid_mid)"
                   if "resid_mid" in name and model.spec.parallel else "")
            raise KeyError(f"{purpose} needs {name!r}, which {model.spec.family} models do not have{why}")
        raise KeyError(f"{purpose} needs {name!r}, which is not in this cache: run_with_cache with a names_filter "
                       f"that includes it")

    def _layer_arg(self, layer) -> int:
        return self.n_layers if layer is None or layer == -1 else int(layer)

    def _empty_stack(self, pos_slice) -> torch.Tensor:
        embed = slice_dim(self._need("hook_embed", "an empty stack's shape"), pos_slice, -2)
        return embed.new_zeros(0, *embed.shape)

    # ------------------------------------------------------------------------------------------ residual stream
    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice=None, mlp_input: bool = False, return_labels: bool = False):
        """The residual stream entering each layer up to ``layer`` (``"0_pre"`` ... ``"final_post"``); ``apply_ln`` at
        the unembed applies the final norm with recomputed statistics (weights included), as TransformerLens."""
        layer = self._layer_arg(layer)
        labels, parts = [], []
        for l in range(layer + 1):
            if l == self.n_layers:
                parts.append(self._need(("resid_post", self.n_layers - 1), "accumulated_resid"))
                labels.append("final_post")
                continue
            parts.append(self._need(("resid_pre", l), "accumulated_resid"))
            labels.append(f"{l}_pre")
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                parts.append(self._need(("resid_mid", l), "accumulated_resid(incl_mid / mlp_input)"))
                labels.append(f"{l}_mid")
        stack = torch.stack([slice_dim(p, pos_slice, -2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input,
                                           has_batch_dim=self.has_batch_dim, recompute_ln=layer == self.n_layers)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice=None, incl_embeds: bool = True, return_labels: bool = False):
        """The residual stream entering ``layer`` as a stack of what wrote it: ``embed``, ``pos_embed``,
        ``{l}_attn_out``, ``{l}_mlp_out`` (``mode`` "all" | "attn" | "mlp")."""
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        layer = self._layer_arg(layer)
        parts, labels = [], []
        if incl_embeds:
            for name, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
                if name in self.cache_dict:
                    parts.append(self.cache_dict[name])
                    labels.append(label)
        for l in range(layer):
            if mode != "mlp":
                parts.append(self._need(("attn_out", l), "decompose_resid"))
                labels.append(f"{l}_attn_out")
            if mode != "attn":
                parts.append(self._need(("mlp_out", l), "decompose_resid"))
                labels.append(f"{l}_mlp_out")
        if mlp_input and mode != "mlp":
            parts.append(self._need(("attn_out", layer), "decompose_resid(mlp_input=True)"))
            labels.append(f"{layer}_attn_out")
        stack = torch.stack([slice_dim(p, pos_slice, -2) for p in parts]) if parts else self._empty_stack(pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    # -------------------------------------------------------------------------------------------------- heads
    def compute_head_results(self) -> None:
        """Cache ``blocks.{l}.attn.hook_result`` [..., H, D] = z_h @ W_O[h] for every layer that lacks it (a
        ``use_attn_result`` trace has it already); attn_out = their sum over heads + b_O, except after a
        post-attention norm (sandwich norms)."""
        model = self._model()
        for l in range(self.n_layers):
            key = f"blocks.{l}.attn.hook_result"
            if key in self.cache_dict:
                continue
            if f"blocks.{l}.attn.ln_sub.hook_scale" in model.hook_dict:
                raise UsageError(f"{model.spec.family} normalises z before W_O (attn.ln_sub), so z @ W_O is not a "
                                 "head's output; trace with use_attn_result=True and cache hook_result instead")
            z = self._need(("z", l, "attn"), "compute_head_results")
            w_o = model.blocks[l].attn.W_O.detach().to(z.device, z.dtype)  # [H, dh, D]
            self.cache_dict[key] = torch.einsum("...hd,hdm->...hm", z, w_o)

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice=None, apply_ln: bool = False):
        """Every head's output for layers before ``layer``, stacked [L*H, ..., D], labels ``"L{l}H{h}"``;
        ``incl_remainder`` adds resid_post of layer-1 minus their sum (``"remainder"``)."""
        layer = self._layer_arg(layer)
        self.compute_head_results()
        parts, labels = [], []
        for l in range(layer):
            result = slice_dim(self[("result", l, "attn")], pos_slice, -3)
            parts.append(result)
            labels.extend(f"L{l}H{h}" for h in range(result.shape[-2]))
        return self._component_stack(parts, labels, layer, "stack_head_results", pos_slice=pos_slice,
                                     incl_remainder=incl_remainder, apply_ln=apply_ln, return_labels=return_labels)

    def _component_stack(self, parts, labels, layer, caller, *, pos_slice, incl_remainder, apply_ln, return_labels):
        """Per-layer [..., C, D] parts stacked to [C_total, ..., D], TL's ``"remainder"`` (resid_post of layer-1 minus
        their sum) appended with ``incl_remainder``, then ``apply_ln``; ``(stack, labels)`` with ``return_labels``."""
        stack = torch.cat(parts, dim=-2).movedim(-2, 0) if parts else None
        if incl_remainder:
            resid = slice_dim(self._need(("resid_post", layer - 1), f"{caller}(incl_remainder)"), pos_slice, -2)
            rest = resid if stack is None else resid - stack.sum(0)
            stack = rest[None] if stack is None else torch.cat([stack, rest[None]])
            labels.append("remainder")
        if stack is None:
            stack = self._empty_stack(pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    # ------------------------------------------------------------------------------------------------ neurons
    def get_neuron_results(self, layer: int, neuron_slice=None, pos_slice=None) -> torch.Tensor:
        """Each neuron's write to the residual, [..., F, D] = post[..., n] * W_out[n] (not cached: cheap)."""
        acts = slice_dim(self._need(("post", layer, "mlp"), "get_neuron_results"), pos_slice, -2)
        w_out = self._model().blocks[layer].mlp.W_out.detach().to(acts.device, acts.dtype)
        if neuron_slice is not None:
            acts, w_out = slice_dim(acts, neuron_slice, -1), slice_dim(w_out, neuron_slice, 0)
        return acts[..., None] * w_out

    def stack_neuron_results(self, layer: int, pos_slice=None, neuron_slice=None, return_labels: bool = False,
                             incl_remainder: bool = False, apply_ln: bool = False):
        """Every neuron's output for layers before ``layer``, stacked [L*F, ..., D], labels ``"L{l}N{n}"``; the sum
        over a layer's neurons is mlp_out - b_out (plain MLP output projection)."""
        layer = self._layer_arg(layer)
        if isinstance(neuron_slice, int):
            neuron_slice = [neuron_slice]  # keep the neuron dim to stack on
        parts, labels = [], []
        for l in range(layer):
            parts.append(self.get_neuron_results(l, neuron_slice=neuron_slice, pos_slice=pos_slice))
            index = slice_dim(torch.arange(self._model().blocks[l].mlp.W_out.shape[0]), neuron_slice, 0)
            labels.extend(f"L{l}N{int(n)}" for n in index.reshape(-1))
        return self._component_stack(parts, labels, layer, "stack_neuron_results", pos_slice=pos_slice,
                                     incl_remainder=incl_remainder, apply_ln=apply_ln, return_labels=return_labels)

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False, pos_slice=None,
                                     return_labels: bool = False):
        """Heads (``L{l}H{h}``), neurons (``L{l}N{n}``, or ``{l}_mlp_out`` without ``expand_neurons``), ``embed``,
        ``pos_embed`` and the summed output biases (``bias``), stacked; as TransformerLens."""
        layer = self._layer_arg(layer)
        heads, labels = self.stack_head_results(layer + (1 if mlp_input else 0), pos_slice=pos_slice,
                                                return_labels=True)
        parts = [heads]
        if layer > 0:
            if expand_neurons:
                neurons, more = self.stack_neuron_results(layer, pos_slice=pos_slice, return_labels=True)
            else:
                neurons, more = self.decompose_resid(layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                                     incl_embeds=False, mode="mlp", return_labels=True)
            parts.append(neurons)
            labels = labels + more
        for name, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
            if name in self.cache_dict:
                parts.append(slice_dim(self.cache_dict[name], pos_slice, -2)[None])
                labels.append(label)
        bias = self._model().accumulated_bias(layer, mlp_input, include_mlp_biases=expand_neurons)
        parts.append(bias.detach().to(heads.device, heads.dtype).expand(1, *heads.shape[1:]))
        labels.append("bias")
        stack = torch.cat(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    # ------------------------------------------------------------------------------------------ norms, logits
    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: int | None = None, mlp_input: bool = False,
                          pos_slice=None, batch_slice=None, has_batch_dim: bool = True,
                          recompute_ln: bool = False) -> torch.Tensor:
        """Each component as it enters ``layer``'s norm (``n_layers``/None/-1: the final norm): centred on LayerNorm
        models, divided by the cached ``hook_scale``; no weight or bias (as TransformerLens). ``recompute_ln`` at
        the final norm runs HF's final norm on each component instead (own statistics, weight and bias)."""
        spec = self._model().spec
        layer = self._layer_arg(layer)
        if has_batch_dim:
            residual_stack = slice_dim(residual_stack, batch_slice, 1)
        if layer == self.n_layers:
            key, norm = "ln_final.hook_scale", spec.final_norm
        else:
            which = "ln2" if mlp_input and (spec.ln2 is not None or not spec.parallel) else "ln1"
            key, norm = f"blocks.{layer}.{which}.hook_scale", getattr(spec, which)
        if norm is None:  # no norm in front of that input: it reads the raw residual (TL: normalization_type None)
            return residual_stack
        if recompute_ln and layer == self.n_layers:
            module = self._model().hf.get_submodule(norm)
            device = next(module.parameters(), residual_stack).device  # a cache moved off the model's device
            return module(residual_stack.to(device)).to(residual_stack.device)
        if spec.norm == "layernorm":
            residual_stack = residual_stack - residual_stack.mean(dim=-1, keepdim=True)
        scale = slice_dim(self._need(key, "apply_ln_to_stack"), pos_slice, -2)
        if batch_slice is not None and self.has_batch_dim:
            scale = slice_dim(scale, batch_slice, 0)
        return residual_stack / scale

    def logit_attrs(self, residual_stack: torch.Tensor, tokens, incorrect_tokens=None, pos_slice=None,
                    batch_slice=None, has_batch_dim: bool = True) -> torch.Tensor:
        """Each component's (final-norm-scaled) dot product with W_U's column of ``tokens`` (minus that of
        ``incorrect_tokens``). Unprocessed weights: the final norm's weight and bias are not in W_U."""
        model = self._model()
        directions = model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            wrong = model.tokens_to_residual_directions(incorrect_tokens)
            if wrong.shape != directions.shape:
                raise ValueError(f"tokens and incorrect_tokens must have the same shape, got "
                                 f"{tuple(directions.shape[:-1])} and {tuple(wrong.shape[:-1])}")
            directions = directions - wrong
        scaled = self.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=pos_slice, batch_slice=batch_slice,
                                        has_batch_dim=has_batch_dim)
        return (scaled * directions.detach().to(scaled.device, scaled.dtype)).sum(dim=-1)

    def apply_slice_to_batch_dim(self, batch_slice) -> "ActivationCache":
        """A cache of the batch rows ``batch_slice`` selects (an int drops the batch dim), as TransformerLens."""
        if not self.has_batch_dim:
            raise UsageError("this cache has no batch dim (remove_batch_dim was applied); there is nothing to slice")
        sliced = {k: slice_dim(v, batch_slice, 0) for k, v in self.cache_dict.items()}
        return type(self)(sliced, self.n_layers, not isinstance(batch_slice, int), self.aliases, self.model)

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None):
        """One activation of every layer before ``layer`` stacked on a new leading dim (``"resid_post"``)."""
        layer = self._layer_arg(layer)
        return torch.stack([self[activation_name, l, sublayer_type] if sublayer_type else self[activation_name, l]
                            for l in range(layer) if (activation_name, l, sublayer_type) in self])


class ActivationCache(ResidAnalysis, Mapping):
    """Activations from ``run_with_cache``, one entry per hook point; read-only mapping."""

    def __init__(self, cache_dict: dict[str, torch.Tensor], n_layers: int, has_batch_dim: bool = True,
                 aliases: dict[str, str] | None = None, model=None):
        self.cache_dict = cache_dict
        self.model = model  # the traced module (weights and cfg for the analysis methods); None for a bare cache
        self.n_layers = n_layers
        self.has_batch_dim = has_batch_dim
        self.aliases = dict(aliases or {})  # TransformerBridge-style alias -> canonical name (as gm.resolve)

    def _key(self, key) -> str:
        if isinstance(key, str):
            if key in self.cache_dict:
                return key
            if key in self.aliases:
                return self.aliases[key]
            short = get_act_name(key)  # one-word shorthand: "embed" -> "hook_embed", "scale" -> "ln_final.hook_scale"
            return short if short in self.cache_dict else key
        if isinstance(key, tuple) and 1 <= len(key) <= 3:
            name, layer, *rest = (*key, None) if len(key) == 1 else key
            if isinstance(layer, int) and layer < 0:
                layer += self.n_layers
            return get_act_name(name, layer, rest[0] if rest else None)
        raise TypeError(f"cache keys are hook names or (name, layer[, layer_type]) tuples, got {key!r}")

    def __getitem__(self, key) -> torch.Tensor:
        name = self._key(key)
        try:
            return self.cache_dict[name]
        except KeyError:
            raise unknown_hook_error(name, self.cache_dict) from None

    def __contains__(self, key) -> bool:
        try:
            return self._key(key) in self.cache_dict
        except TypeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def to(self, device) -> "ActivationCache":
        return ActivationCache({k: v.to(device) for k, v in self.cache_dict.items()}, self.n_layers, self.has_batch_dim,
                               self.aliases, self.model)

    def remove_batch_dim(self) -> "ActivationCache":
        if not self.has_batch_dim:
            return self
        for value in self.cache_dict.values():
            if value.shape[0] != 1:
                raise ValueError(f"remove_batch_dim needs batch size 1, got {value.shape[0]}")
        return ActivationCache({k: v[0] for k, v in self.cache_dict.items()}, self.n_layers, False, self.aliases, self.model)

    def __repr__(self) -> str:
        return f"ActivationCache with {len(self)} entries: {list(self.cache_dict)[:8]}{'...' if len(self) > 8 else ''}"
