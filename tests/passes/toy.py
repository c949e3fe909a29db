"""Toy HF-shaped models for the pass tests, captured by fxbridge's own ``capture``, and the one pass adapter.

A toy model has HF's module paths (``model.layers.{i}.self_attn.q_proj``, ``lm_head``) and computes what the
pass looks for in a few lines, so the captured graph carries the node metadata a real capture does
(``nn_module_stack``, fake values with symbolic batch and sequence, ``get_attr hf.*``) without tracing an HF
model. Each test captures its toy once (``capture_toy``) and works on a fresh copy (``Toy.fresh``).

Every test calls a pass through ``run_pass``: when the pass API changes, only that function changes.
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxbridge.architectures import ArchSpec
from fxbridge.errors import PatternNotFound
from fxbridge.passes import PASSES, NoMatch, PassContext, run_passes
from fxbridge.runtime.hook_point import HookPoint
from fxbridge.tracer import capture

TOL = 1e-6  # fp32 max-abs difference allowed where a pass reorders arithmetic (fused vs explicit cores)
D, H, G, DH, FF, VOCAB = 32, 4, 2, 8, 48, 61  # d_model, heads, KV heads, head size, MLP width, vocab


# ------------------------------------------------------------------------------------------------ the adapter
def run_pass(name: str, graph: fx.Graph, root: nn.Module, spec: ArchSpec, dims: dict, config=None) -> int:
    """Run pass ``name`` (configured as ``spec.passes`` lists it, else unconfigured) through the runner (which checks its match count against ``spec`` and ``dims``, lints the
    graph, and raises ``PatternNotFound`` otherwise); returns the match count."""
    ctx = PassContext(graph, root, spec, dims, config)
    graph_pass = next((p for p in spec.passes if p.name == name), None) or _as_a_family_configures(name)
    (result,) = run_passes(ctx, [graph_pass], already_run=graph_pass.requires)  # the toy is built with those
    return result.matches


# ---------------------------------------------------------------------------------------- specs, dims, configs
def toy_spec(**fields) -> ArchSpec:
    """A spec with the default (Llama) module paths, which the toy models use; ``fields`` override it."""
    return ArchSpec(model_types=("toy",), family="toy", **fields)


def toy_config(n_layers: int = 2, **extra) -> SimpleNamespace:
    """What ``capture`` and the passes read from an HF config (``_attn_implementation`` is switched by capture)."""
    return SimpleNamespace(**{**dict(vocab_size=VOCAB, hidden_size=D, num_attention_heads=H, num_key_value_heads=G,
                                     head_dim=DH, num_hidden_layers=n_layers, max_position_embeddings=64,
                                     _attn_implementation=None), **extra})


def toy_dims(config, **extra) -> dict:
    return dict(n_layers=config.num_hidden_layers, d_model=D, n_heads=config.num_attention_heads,
                n_kv_heads=config.num_key_value_heads, d_head=config.head_dim, d_vocab=VOCAB, **extra)


# --------------------------------------------------------------------------------------------- toy modules
class RMSNorm(nn.Module):
    """HF's RMSNorm: ``w * (x * rsqrt(mean(x^2) + eps))``; ``pow_form`` writes ``pow(v, -0.5)`` as Gemma 4 does."""

    def __init__(self, d: int = D, eps: float = 1e-6, pow_form: bool = False):
        super().__init__()
        self.weight, self.eps, self.pow_form = nn.Parameter(torch.ones(d)), eps, pow_form

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True) + self.eps
        return self.weight * (x * (var.pow(-0.5) if self.pow_form else torch.rsqrt(var)))


def rotary(x):
    """HF's rotate-half RoPE on [B,h,S,d] at positions 0..S-1 (a rotation: linear in x)."""
    s, d = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / (10.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = torch.arange(s, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


def causal_mask(s: int, dtype=torch.float32):
    """HF's additive causal mask [1,1,S,S]: 0 on and below the diagonal, finfo.min above."""
    return torch.full((s, s), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


class Attention(nn.Module):
    """HF's attention module in miniature: per-head views of separate projections, optional q/k/v norms and RoPE,
    then the captured ``fxbridge::attention`` op (what HF's AttentionInterface calls during a capture).

    ``kv_from=j``: no k/v projections, reuse layer j's keys and values (Gemma 4 KV sharing). ``k_eq_v``: no
    v projection, the value path is the k projection through ``v_norm``. ``record``: keep q/k/v (eager only).
    """

    def __init__(self, config, layer_idx: int, *, heads=None, rotary: bool = False, norms: bool = False,
                 kv_from: int | None = None, k_eq_v: bool = False, softcap: float | None = None):
        super().__init__()
        self.h, self.g, self.d = heads or (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.layer_idx, self.rotary, self.kv_from, self.softcap = layer_idx, rotary, kv_from, softcap
        self.scaling, self.record, self.seen = self.d ** -0.5, False, {}
        self.q_proj = nn.Linear(D, self.h * self.d)
        if kv_from is None:
            self.k_proj = nn.Linear(D, self.g * self.d)
            self.v_proj = None if k_eq_v else nn.Linear(D, self.g * self.d)
        if norms:
            self.q_norm, self.k_norm, self.v_norm = RMSNorm(self.d), RMSNorm(self.d), RMSNorm(self.d)
        self.o_proj = nn.Linear(self.h * self.d, D)

    def _norm(self, name, x):
        return getattr(self, name)(x) if hasattr(self, name) else x

    def forward(self, x, mask, state):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.d)
        self._keep(q=q)
        q = self._norm("q_norm", q).transpose(1, 2)
        if self.kv_from is None:
            k = self.k_proj(x).view(b, s, -1, self.d)
            v = k if self.v_proj is None else self.v_proj(x).view(b, s, -1, self.d)
            self._keep(k=k, v=v)
            k = self._norm("k_norm", k).transpose(1, 2)
            v = self._norm("v_norm", v).transpose(1, 2)
            if self.rotary:
                k = rotary(k)
            state.setdefault("kv", {})[self.layer_idx] = (k, v)
        else:
            k, v = state["kv"][self.kv_from]
        if self.rotary:
            q = rotary(q)
        self._keep(rot_q=q.transpose(1, 2), rot_k=k.transpose(1, 2))
        z = torch.ops.fxbridge.attention(q, k, v, mask, self.scaling, self.softcap, self.layer_idx)
        self._keep(z=z)
        return self.o_proj(z.reshape(b, s, -1))

    def _keep(self, **values):
        if self.record:
            self.seen.update({k: v.detach().clone() for k, v in values.items()})


class GatedMLP(nn.Module):
    def __init__(self, d_ff: int = FF):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(D, d_ff), nn.Linear(D, d_ff), nn.Linear(d_ff, D)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PlainMLP(nn.Module):
    """GPT-2's MLP: c_fc -> GELU -> c_proj (spec: mlp_gate=None, mlp_in="c_fc", mlp_out="c_proj")."""

    def __init__(self, d_ff: int = FF):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(D, d_ff), nn.Linear(d_ff, D)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer; ``parallel``: attention and MLP both read ln1(x) and add to x (no resid_mid)."""

    def __init__(self, config, i: int, *, norm=RMSNorm, mlp=GatedMLP, parallel: bool = False, **attn):
        super().__init__()
        self.parallel = parallel
        self.input_layernorm = norm(D)
        self.self_attn = Attention(config, i, **attn)
        if not parallel:
            self.post_attention_layernorm = norm(D)
        self.mlp = mlp()

    def forward(self, x, mask, state):
        if self.parallel:
            h = self.input_layernorm(x)
            return x + self.self_attn(h, mask, state) + self.mlp(h)
        x = x + self.self_attn(self.input_layernorm(x), mask, state)
        return x + self.mlp(self.post_attention_layernorm(x))


class ToyModel(nn.Module):
    """HF's ``model``: embed_tokens [+ embed_positions], layers, norm. ``prepare(state)`` lets a subclass add inputs."""

    def __init__(self, config, layers, *, norm=RMSNorm, pos_embed: bool = False):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, D)
        if pos_embed:
            self.embed_positions = nn.Embedding(config.max_position_embeddings, D)
        self.layers = nn.ModuleList(layers)
        self.norm = norm(D)

    def prepare(self, state) -> None:
        pass

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids)
        if hasattr(self, "embed_positions"):  # GPT-2: [1,S,D] position rows, broadcast over the batch
            x = x + self.embed_positions(torch.arange(input_ids.shape[1])[None])
        mask = causal_mask(input_ids.shape[1], x.dtype)
        state = {"input_ids": input_ids}
        self.prepare(state)
        for layer in self.layers:
            x = layer(x, mask, state)
        return self.norm(x)


class ToyLM(nn.Module):
    """HF's ``*ForCausalLM``: ``model`` + ``lm_head`` [+ final-logit softcap ``cap * tanh(logits / cap)``]."""

    def __init__(self, config, model: nn.Module, final_softcap: float | None = None):
        super().__init__()
        self.config, self.model, self.final_softcap = config, model, final_softcap
        self.lm_head = nn.Linear(D, config.vocab_size, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        logits = self.lm_head(self.model(input_ids))
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


def toy_lm(n_layers: int = 2, *, layer=DecoderLayer, norm=RMSNorm, pos_embed=False, final_softcap=None,
           config=None, model_cls=ToyModel, per_layer=None, seed: int = 0, **layer_kw) -> ToyLM:
    """A random-weight toy LM (every parameter perturbed, so norm weights and biases matter), in eval mode.

    ``layer_kw`` go to every layer, ``per_layer(i)`` adds keyword arguments for layer i.
    """
    torch.manual_seed(seed)
    config = config or toy_config(n_layers)
    layers = [layer(config, i, norm=norm, **layer_kw, **(per_layer(i) if per_layer else {}))
              for i in range(config.num_hidden_layers)]
    lm = ToyLM(config, model_cls(config, layers, norm=norm, pos_embed=pos_embed), final_softcap)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return lm.eval()


# The toys several test files share, captured once per session (``captured``).
TOYS = {
    "llama": lambda: toy_lm(2, rotary=True),  # RMSNorm, gated MLP, separate q/k/v, RoPE
    "gpt2": lambda: toy_lm(2, norm=nn.LayerNorm, mlp=PlainMLP, pos_embed=True),  # LayerNorm, GELU MLP, positions
    "shared_kv": lambda: toy_lm(2, rotary=True, per_layer=lambda i: {"kv_from": 0} if i == 1 else {}),
}
LLAMA_SPEC = toy_spec()
GPT2_SPEC = toy_spec(pos_embed="model.embed_positions", mlp_gate=None, mlp_in="c_fc", mlp_out="c_proj",
                     norm="layernorm", rotary=False)


# ------------------------------------------------------------------------------------------------ capture
@dataclass
class Toy:
    """A captured toy: the eager model (the oracle) and the graph fxbridge's capture made of it."""

    model: nn.Module
    root: nn.Module
    graph: fx.Graph

    def fresh(self) -> tuple[nn.Module, fx.Graph]:
        """A copy of the captured graph and a new root over the same model: each test rewrites its own."""
        graph = copy_graph(self.graph)
        root = nn.Module()
        for name, child in self.root.named_children():
            root.add_module(name, child)
        for name, buf in self.root.named_buffers(recurse=False):
            root.register_buffer(name, buf, persistent=False)
        return root, graph


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """The same nodes and meta in a new graph (module stacks copied: passes edit them on their nodes)."""
    new = fx.Graph()
    new.output(new.graph_copy(graph, {}))
    for node in new.nodes:
        if "nn_module_stack" in node.meta:
            node.meta["nn_module_stack"] = dict(node.meta["nn_module_stack"])
    return new


def capture_toy(model: nn.Module) -> Toy:
    """Capture ``model`` as ``fxbridge.trace`` does (torch.export, get_attr nodes into ``hf.*``)."""
    out = capture(model, layers="model.layers")  # every toy keeps its layers where Llama does
    return Toy(model, out.root, out.graph)


@functools.cache
def captured(name: str) -> Toy:
    """The shared toy ``name`` of ``TOYS``, captured once per session; call ``.fresh()`` for a graph to rewrite."""
    return capture_toy(TOYS[name]())


def tokens(batch: int = 2, seq: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def run(root: nn.Module, graph: fx.Graph, ids: torch.Tensor) -> torch.Tensor:
    """Run ``graph`` (a copy: a GraphModule would own the graph, and passes cannot add modules to it afterwards)."""
    with torch.no_grad():
        return fx.GraphModule(root, copy_graph(graph))(ids, torch.ones_like(ids))


def eager(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


# ------------------------------------------------------------------------------------------------- counting
def _op_name(target) -> str:
    return getattr(target, "__name__", None) if callable(target) and not hasattr(target, "_schema") else str(target)


def op_counts(graph) -> Counter:
    """call_function targets -> count ("aten.rsqrt.default", "fxbridge.attention.default", "per_head_result"),
    in a graph or a list of nodes."""
    nodes = graph.nodes if isinstance(graph, fx.Graph) else graph
    return Counter(_op_name(n.target) for n in nodes if n.op == "call_function")


def module_calls(graph: fx.Graph) -> list[str]:
    """Targets of the call_module nodes (hook points and cores), in graph order."""
    return [n.target for n in graph.nodes if n.op == "call_module"]


def hook_nodes(graph: fx.Graph) -> list[str]:
    """Names of the hook-point nodes passes spliced into the data path, in graph order."""
    return [n.target for n in graph.nodes if n.op == "call_module" and n.meta.get("fxbridge_hook")]


def hook_points(root: nn.Module) -> list[str]:
    """Every HookPoint installed under root (cores' children included)."""
    return [name for name, m in root.named_modules() if isinstance(m, HookPoint)]


def watch(root: nn.Module, names, clone: bool = True) -> dict:
    """name -> what hook point ``name`` saw in the last forward (a clone, or the tensor itself)."""
    seen = {}
    for name in names:
        root.get_submodule(name).add_hook(
            lambda t, hook, name=name: seen.__setitem__(name, t.detach().clone() if clone else t))
    return seen


def module_io(model: nn.Module, ids: torch.Tensor, paths) -> dict:
    """path -> (first input, output) of the toy's own submodules in one eager forward: the oracle for hook values."""
    seen, handles = {}, []
    for path in paths:
        handles.append(model.get_submodule(path).register_forward_hook(
            lambda mod, args, out, path=path: seen.__setitem__(path, (args[0].detach().clone(), out.detach().clone()))))
    try:
        eager(model, ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def no_match(name: str, graph: fx.Graph, root: nn.Module, spec: ArchSpec, dims: dict, config=None):
    """The PatternNotFound the runner raises for ``name`` on this graph (pytest.fail when it does not)."""
    with pytest.raises(PatternNotFound) as info:
        run_pass(name, graph, root, spec, dims, config)
    return info.value


def _as_a_family_configures(name: str):
    """Pass ``name`` as the first registered family lists it: the toys copy that family's HF module names (Gemma 4's
    ``router`` / ``experts`` / ``per_layer_input_gate``), so they need the same parameters."""
    from fxbridge.architectures import REGISTRY
    for spec in REGISTRY.values():
        for p in spec.passes:
            if p.name == name and p.options:
                return p
    return PASSES[name]


def missed(err: PatternNotFound, expected: int, found: int) -> bool:
    """Whether ``err`` says the pass matched ``found`` of ``expected`` sites: either the pass stopped at a site
    without its pattern (``NoMatch``: the error names where it looked and what it saw), or it finished with the
    wrong count (the runner's check)."""
    if isinstance(err.__cause__, NoMatch):
        return found < expected and bool(err.where) and bool(err.expected)
    return (err.expected, err.found) == (f"{expected} match(es)", str(found))


def delta(before: Counter, after: Counter) -> dict:
    """Op -> change in count, for the ops whose count changed (ExecuTorch's ops_before_pass / ops_after_pass)."""
    return {op: after[op] - before[op] for op in sorted(set(before) | set(after)) if after[op] != before[op]}


def set_stack(node: fx.Node, *paths: str) -> fx.Node:
    """Give a hand-built node the module stack a capture would (outermost path first)."""
    node.meta["nn_module_stack"] = {f"L__{i}": (p, nn.Module) for i, p in enumerate(paths)}
    return node
