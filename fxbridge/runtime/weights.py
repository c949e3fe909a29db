"""Weights in TransformerLens layouts (``W_Q`` [L,H,D,dh] ...), read from the HF modules the spec names.

Unprocessed, as TransformerLens's ``from_pretrained_no_processing``: no LayerNorm folding, no centring, no
``(1 + w)`` added to Gemma's norm weights. Per-layer tensors are views of the HF weights wherever the layout
allows (editing ``gm.blocks[3].attn.W_Q`` in place edits ``q_proj.weight``); model-level properties stack the
layers, which copies (as TransformerLens's ``torch.stack`` does). Which tensor is a view and which a copy is
listed in ``docs/tl_weights_cache.md``.

``gm.blocks[i]`` is a ``BlockView``: the layer's weights plus its hook points as attributes. The ``blocks``
container of hook points (an ``nn.Module``, the graph's ``call_module`` targets live under it) becomes a
``LayerStack``: the same children, state_dict and hook names, plus ``len`` / indexing / iteration.
"""
from __future__ import annotations

import weakref

import torch

from ..errors import UsageError
from ..passes.qkv_layouts import split_eager

_NORMS = ("ln1", "ln2", "ln1_post", "ln2_post")


def _in_out(module: torch.nn.Module) -> torch.Tensor:
    """The weight as [in, out]: Conv1D (GPT-2) stores it so, Linear stores [out, in] (a transposed view)."""
    return module.weight if type(module).__name__ == "Conv1D" else module.weight.T


def _bias(module: torch.nn.Module, size: int, like: torch.Tensor) -> torch.Tensor:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else like.new_zeros(size)


class LayerWeights:
    """Layer ``i``'s weights in TransformerLens layouts, as views of the HF weights (``gm.blocks[i]`` reads these)."""

    def __init__(self, gm, i: int):
        self.gm, self.i, self.spec = gm, i, gm.spec

    # ----------------------------------------------------------------------------------------- module lookup
    def _module(self, path: str | None, what: str) -> torch.nn.Module:
        try:
            module = None if path is None else self.gm.hf.get_submodule(path)
        except AttributeError:
            module = None
        if module is None:
            raise UsageError(f"{self.spec.family} layer {self.i} has no {what} (looked for {path!r} in the HF "
                             f"model{'; ' + self.spec.notes if self.spec.notes else ''}); read that layer's "
                             "modules from gm.hf directly")
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise UsageError(f"{self.spec.family} layer {self.i}'s {what} {path!r} is a {type(module).__name__} with "
                             "no weight tensor (a mixture of experts, or a norm without parameters): it has no "
                             f"single weight in TransformerLens's sense; read it from gm.hf.{path}")
        return module

    def _attn(self, rel: str | None, what: str) -> torch.nn.Module:
        return self._module(None if rel is None else self.spec.layer(self.i, f"{self.spec.attn}.{rel}"), what)

    # --------------------------------------------------------------------------------------------- attention
    def _qkv(self, role: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [n,D,dh], b [n,dh]) of ``role`` in "qkv", n = H for q, Hkv for k/v (before any repeat)."""
        spec, dims = self.spec, self.gm.dims
        if spec.qkv is not None:
            fused = self._attn(spec.qkv, "fused qkv projection")
            w = _in_out(fused)  # [D, N]
            h, hkv, dh = dims["n_heads"], dims["n_kv_heads"], dims["d_head"]
            weight = split_eager(w.unsqueeze(0), spec.qkv_layout, h, hkv, dh)[role][0].permute(1, 0, 2)
            bias = getattr(fused, "bias", None)
            n = weight.shape[0]
            if isinstance(bias, torch.Tensor):
                return weight, split_eager(bias.view(1, 1, -1), spec.qkv_layout, h, hkv, dh)[role][0, 0]
            return weight, w.new_zeros(n, dh)
        rel = getattr(spec, role)
        if rel is None:
            raise UsageError(f"{spec.family} has no separate {role} projection in TransformerLens's sense "
                             f"({spec.notes or 'see the family notes'}); read layer {self.i}'s attention modules "
                             f"from gm.hf.{spec.layer(self.i, spec.attn)}")
        module = self._attn(rel, f"{role} projection ({rel!r}; KV-sharing layers reuse another layer's k/v, "
                                 f"attention_k_eq_v layers have no v_proj: their values are W_K's)")
        w = _in_out(module)  # [D, n*dh]
        dh = self._head_dim()
        weight = w.unflatten(1, (-1, dh)).permute(1, 0, 2)
        return weight, _bias(module, w.shape[1], w).view(-1, dh)

    def _head_dim(self) -> int:
        """Per-layer head size: q's output width over H (Gemma 4 full layers differ from sliding ones)."""
        if self.spec.q is None:
            return self.gm.dims["d_head"]
        return _in_out(self._attn(self.spec.q, "query projection")).shape[1] // self.gm.dims["n_heads"]

    def _repeat(self, t: torch.Tensor) -> torch.Tensor:
        """TransformerLens's GQA W_K / W_V: each KV head repeated for its group (``repeat_interleave``, a copy)."""
        reps = self.gm.dims["n_heads"] // t.shape[0]
        return t if reps == 1 else torch.repeat_interleave(t, reps, dim=0)

    W_Q = property(lambda self: self._qkv("q")[0], doc="[H, D, dh]")
    b_Q = property(lambda self: self._qkv("q")[1], doc="[H, dh]")
    _W_K = property(lambda self: self._qkv("k")[0], doc="[Hkv, D, dh], a view where the layout allows")
    _b_K = property(lambda self: self._qkv("k")[1])
    _W_V = property(lambda self: self._qkv("v")[0], doc="[Hkv, D, dh], a view where the layout allows")
    _b_V = property(lambda self: self._qkv("v")[1])
    W_K = property(lambda self: self._repeat(self._W_K), doc="[H, D, dh]: repeated to H heads for GQA (a copy)")
    b_K = property(lambda self: self._repeat(self._b_K))
    W_V = property(lambda self: self._repeat(self._W_V), doc="[H, D, dh]: repeated to H heads for GQA (a copy)")
    b_V = property(lambda self: self._repeat(self._b_V))

    @property
    def W_O(self) -> torch.Tensor:
        """[H, dh, D]: the output projection's input dim split per head (a view)."""
        w = _in_out(self._attn(self.spec.o_proj, "attention output projection"))  # [H*dh, D]
        return w.unflatten(0, (self.gm.dims["n_heads"], -1))

    @property
    def b_O(self) -> torch.Tensor:
        module = self._attn(self.spec.o_proj, "attention output projection")
        w = _in_out(module)
        return _bias(module, w.shape[1], w)

    # --------------------------------------------------------------------------------------------------- MLP
    def _mlp(self, rel: str | None, what: str) -> torch.nn.Module:
        spec = self.spec
        if self.i in spec.moe_layers and not spec.moe_beside_mlp:
            raise UsageError(f"{spec.family} layer {self.i} is a mixture-of-experts block: it has no single {what} "
                             f"in TransformerLens's sense; its router and experts are under "
                             f"gm.hf.{spec.mlp_path(self.i)}")
        return self._module(None if rel is None else spec.mlp_path(self.i, rel), f"MLP {what}")

    def _fused_gate_up(self) -> bool:
        return self.spec.mlp_gate is not None and self.spec.mlp_gate == self.spec.mlp_in

    @property
    def W_in(self) -> torch.Tensor:
        """[D, F]: the input projection (the up projection of a gated MLP), a view."""
        w = _in_out(self._mlp(self.spec.mlp_in, "input projection"))
        return w[:, w.shape[1] // 2:] if self._fused_gate_up() else w  # HF chunks [gate | up]

    @property
    def b_in(self) -> torch.Tensor:
        module = self._mlp(self.spec.mlp_in, "input projection")
        w = _in_out(module)
        b = _bias(module, w.shape[1], w)
        return b[w.shape[1] // 2:] if self._fused_gate_up() else b

    @property
    def W_gate(self) -> torch.Tensor:
        """[D, F]: the gate projection of a gated MLP (hook_pre is its output), a view."""
        if self.spec.mlp_gate is None:
            raise AttributeError(f"{self.spec.family} has no gated MLP, so no W_gate (TransformerLens: None)")
        w = _in_out(self._mlp(self.spec.mlp_gate, "gate projection"))
        return w[:, : w.shape[1] // 2] if self._fused_gate_up() else w

    @property
    def W_out(self) -> torch.Tensor:
        """[F, D]: the output projection, a view."""
        return _in_out(self._mlp(self.spec.mlp_out, "output projection"))

    @property
    def b_out(self) -> torch.Tensor:
        module = self._mlp(self.spec.mlp_out, "output projection")
        w = _in_out(module)
        return _bias(module, w.shape[1], w)

    # ------------------------------------------------------------------------------------------------- norms
    def norm(self, which: str) -> torch.nn.Module:
        rel = getattr(self.spec, which)
        if rel is None:
            raise AttributeError(f"{self.spec.family} layers have no {which} norm")
        return self._module(self.spec.layer(self.i, rel), f"{which} norm")


class _View:
    """Weights by lookup, everything else (hook points) from the traced container module ``_mod``."""

    _WEIGHTS: tuple[str, ...] = ()

    def __init__(self, weights: LayerWeights, module: torch.nn.Module | None, label: str):
        self._w, self._mod, self._label = weights, module, label

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_w", "_mod", "_label"):
            raise AttributeError(name)
        if name in self._WEIGHTS:
            return getattr(self._w, name)
        if self._mod is not None and hasattr(self._mod, name):
            return getattr(self._mod, name)
        raise AttributeError(f"{self._label} has no attribute {name!r}")

    def __dir__(self):
        return sorted({*self._WEIGHTS, *(dict(self._mod.named_children()) if self._mod is not None else ())})

    def __repr__(self) -> str:
        return f"<{self._label}: {', '.join(self.__dir__())}>"


class AttnView(_View):
    _WEIGHTS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "_W_K", "_W_V", "_b_K", "_b_V")


class MLPView(_View):
    _WEIGHTS = ("W_in", "W_gate", "W_out", "b_in", "b_out")


class NormView(_View):
    """``w`` / ``b`` of the HF norm (``b`` only on LayerNorm), hook_scale / hook_normalized from the traced core."""

    def __init__(self, weights: LayerWeights, module, label: str, which: str):
        super().__init__(weights, module, label)
        self._which = which

    @property
    def w(self) -> torch.Tensor:
        return self._w.norm(self._which).weight

    @property
    def b(self) -> torch.Tensor:
        bias = getattr(self._w.norm(self._which), "bias", None)
        if bias is None:  # AttributeError, so hasattr(ln, "b") is False as in TransformerLens's RMSNorm
            raise AttributeError(f"{self._label} is an RMSNorm (or a LayerNorm without bias): it has a weight w and "
                                 "no bias b")
        return bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The whole HF norm of ``x`` (weight and bias included), as TransformerLens's ``blocks[i].ln1(x)``."""
        return self._w.norm(self._which)(x)

    def __getattr__(self, name: str):
        if name == "b":  # reached when the property above raised: say why
            raise AttributeError(f"{self._label} is an RMSNorm (or a LayerNorm without bias): it has a weight w and "
                                 "no bias b")
        return super().__getattr__(name)


class BlockView(_View):
    """``gm.blocks[i]``: ``.attn`` / ``.mlp`` / ``.ln1`` ... with weights and hook points, the layer's hook points."""

    def __init__(self, gm, i: int, module: torch.nn.Module):
        super().__init__(LayerWeights(gm, i), module, f"gm.blocks[{i}]")

    def _child(self, name: str):
        return self._mod._modules.get(name)

    @property
    def attn(self) -> AttnView:
        return AttnView(self._w, self._child("attn"), f"{self._label}.attn")

    @property
    def mlp(self) -> MLPView:
        return MLPView(self._w, self._child("mlp"), f"{self._label}.mlp")

    def __getattr__(self, name: str):
        if name in _NORMS:
            if getattr(self._w.spec, name) is None:
                raise AttributeError(f"{self._w.spec.family} layers have no {name} norm")
            return NormView(self._w, self._child(name), f"{self._label}.{name}", name)
        return super().__getattr__(name)

    def __dir__(self):
        return sorted({*super().__dir__(), "attn", "mlp", *(n for n in _NORMS if getattr(self._w.spec, n))})


class LayerStack(torch.nn.Module):
    """The traced module's ``blocks`` container (children ``"0"``, ``"1"``...): ``len``, ``[i]`` (negative too) and
    iteration give ``BlockView``s; the children, hook names and state_dict are the container's, unchanged."""

    def _owner(self):
        ref = self.__dict__.get("_fxb_owner")
        gm = ref() if ref is not None else None
        if gm is None:
            raise UsageError("this blocks container is not attached to a traced module; use gm.blocks[i]")
        return gm

    def __len__(self) -> int:
        return self._owner().dims["n_layers"]

    def __getitem__(self, i: int) -> BlockView:
        n = len(self)
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"gm.blocks takes an int layer index, got {type(i).__name__} {i!r}")
        if not -n <= i < n:
            raise IndexError(f"gm.blocks[{i}]: the model has {n} layers")
        i %= n
        return BlockView(self._owner(), i, self._modules.get(str(i)) or torch.nn.Module())

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_fxb_owner", None)
        return state


def attach_layer_stack(root: torch.nn.Module, gm) -> None:
    """Make ``root.blocks`` a ``LayerStack`` (same children) bound to ``gm``; the graph's targets are unchanged."""
    if not isinstance(root, torch.nn.Module):
        return
    blocks = root._modules.get("blocks")
    if blocks is None:
        return
    if type(blocks) is torch.nn.Module:
        stack = LayerStack()
        for name, child in blocks.named_children():
            stack.add_module(name, child)
        root._modules["blocks"] = stack
        blocks = stack
    if isinstance(blocks, LayerStack):
        blocks.__dict__["_fxb_owner"] = weakref.ref(gm)


class _Namespace:
    """``gm.embed.W_E``, ``gm.pos_embed.W_pos``, ``gm.unembed.W_U`` / ``b_U``: TransformerLens's component paths;
    calling one runs the HF module (``gm.unembed(x)`` is lm_head's output, as ``hook_unembed``; ``gm.embed(tokens)``
    the embedding module's, as ``hook_embed``)."""

    def __init__(self, gm, names: tuple[str, ...], path: str | None):
        self._gm, self._names, self._path = gm, names, path

    def __getattr__(self, name: str):
        if name in ("_gm", "_names", "_path") or name not in self._names:
            raise AttributeError(name)
        return getattr(self._gm, name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._path is None:
            raise UsageError(f"{self._gm.spec.family} has no {self._names[0]} module")
        return self._gm.hf.get_submodule(self._path)(x)

    def __dir__(self):
        return list(self._names)


def _per_layer(name: str, doc: str) -> property:
    def get(self) -> torch.Tensor:
        return self._stack_layers(name)
    return property(get, doc=f"{doc}, stacked over layers (a copy; gm.blocks[i].attn/.mlp hold the per-layer views)")


class WeightsMixin:
    """TransformerLens's weight properties on a traced module (unprocessed, TL's ``from_pretrained_no_processing``)."""

    def __init__(self, root, graph, *args, **kwargs):
        attach_layer_stack(root, self)  # before GraphModule copies the children: gm.blocks is the LayerStack
        super().__init__(root, graph, *args, **kwargs)

    def _stack_layers(self, name: str) -> torch.Tensor:
        tensors = [getattr(self.blocks[i]._w, name) for i in range(self.dims["n_layers"])]
        try:
            return torch.stack(tensors)
        except RuntimeError:
            shapes = sorted({tuple(t.shape) for t in tensors})
            raise UsageError(f"{self.spec.family}: {name} differs in shape between layers ({shapes}), so it does not "
                             f"stack to one [n_layers, ...] tensor; read it per layer: gm.blocks[i].<attn|mlp>.{name}"
                             ) from None

    W_Q = _per_layer("W_Q", "[L, H, D, dh]")
    W_K = _per_layer("W_K", "[L, H, D, dh] (GQA: KV heads repeated to H, as TransformerLens)")
    W_V = _per_layer("W_V", "[L, H, D, dh] (GQA: KV heads repeated to H, as TransformerLens)")
    _W_K = _per_layer("_W_K", "[L, Hkv, D, dh]")
    _W_V = _per_layer("_W_V", "[L, Hkv, D, dh]")
    W_O = _per_layer("W_O", "[L, H, dh, D]")
    b_Q = _per_layer("b_Q", "[L, H, dh] (zeros where HF has no bias)")
    b_K = _per_layer("b_K", "[L, H, dh]")
    b_V = _per_layer("b_V", "[L, H, dh]")
    _b_K = _per_layer("_b_K", "[L, Hkv, dh]")
    _b_V = _per_layer("_b_V", "[L, Hkv, dh]")
    b_O = _per_layer("b_O", "[L, D]")
    W_in = _per_layer("W_in", "[L, D, F]")
    W_out = _per_layer("W_out", "[L, F, D]")
    b_in = _per_layer("b_in", "[L, F]")
    b_out = _per_layer("b_out", "[L, D]")

    @property
    def W_gate(self) -> torch.Tensor | None:
        """[L, D, F] for a gated MLP; None otherwise (as TransformerLens)."""
        return None if self.spec.mlp_gate is None else self._stack_layers("W_gate")

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
        """[D]: the attention (and MLP) output biases of layers before ``layer``, plus ``layer``'s b_O for
        ``mlp_input``, as TransformerLens (zeros for a bias-free model)."""
        total = self.W_U.new_zeros(self.dims["d_model"])
        for i in range(layer):
            total = total + self.blocks[i].attn.b_O
            if include_mlp_biases:
                total = total + self.blocks[i].mlp.b_out
        if mlp_input:
            if layer >= self.dims["n_layers"]:
                raise ValueError(f"mlp_input needs a layer below n_layers={self.dims['n_layers']}, got {layer}")
            total = total + self.blocks[layer].attn.b_O
        return total

    def _hf_module(self, path: str | None, what: str, fix: str) -> torch.nn.Module:
        if path is None:
            raise UsageError(f"{self.spec.family} has no {what}: {fix}")
        return self.hf.get_submodule(path)

    @property
    def W_E(self) -> torch.Tensor:
        """[V, D]: the token embedding weight (a view; Gemma's sqrt(D) scaling is not in it, it is in hook_embed)."""
        return self._hf_module(self.spec.embed, "token embedding", "").weight

    @property
    def W_pos(self) -> torch.Tensor:
        """[n_ctx, D]: learned absolute position embeddings (a view; OPT's offset rows dropped)."""
        module = self._hf_module(self.spec.pos_embed, "learned position embedding (W_pos)",
                                 "its positions are rotary, ALiBi or absent; only learned absolute positions have one")
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise UsageError(f"{self.spec.family}'s position embedding {type(module).__name__} has no learned weight "
                             "(sinusoidal); there is no W_pos")
        offset = getattr(module, "offset", 0)
        return weight[offset:] if isinstance(offset, int) and offset else weight

    @property
    def W_U(self) -> torch.Tensor:
        """[D, V]: the unembedding (lm_head weight transposed, a view; tied models share W_E's storage)."""
        return _in_out(self._hf_module(self.spec.unembed, "unembedding", ""))

    @property
    def b_U(self) -> torch.Tensor:
        """[V]: lm_head's bias, zeros where it has none (as TransformerLens)."""
        w = self.W_U
        return _bias(self._hf_module(self.spec.unembed, "unembedding", ""), w.shape[1], w)

    embed = property(lambda self: _Namespace(self, ("W_E",), self.spec.embed), doc="``gm.embed.W_E``")
    pos_embed = property(lambda self: _Namespace(self, ("W_pos",), None), doc="``gm.pos_embed.W_pos``")
    unembed = property(lambda self: _Namespace(self, ("W_U", "b_U"), self.spec.unembed),
                       doc="``gm.unembed.W_U`` / ``b_U``; ``gm.unembed(x)`` runs lm_head")

    def tokens_to_residual_directions(self, tokens) -> torch.Tensor:
        """W_U's column for each token: [D] for one token (int, str, 1-element tensor), [..., D] for a tensor."""
        if isinstance(tokens, torch.Tensor) and tokens.numel() > 1:
            return self.W_U[:, tokens].movedim(0, -1)
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        elif isinstance(tokens, torch.Tensor):
            tokens = int(tokens.item())
        return self.W_U[:, tokens]
