"""Spec inference: an ``ArchSpec`` for a model whose ``model_type`` fxbridge has no spec for.

``get_spec`` first tries the class (route 1): a model whose causal-LM class is a registered family's class
(EXAONE and InternLM3 checkpoints load as ``LlamaForCausalLM``) gets that family's spec. Otherwise ``trace``
infers one (route 2) from the module tree and one capture, reading the graph's use-def edges:

- ``embed`` / ``unembed``: ``model.get_input_embeddings()`` / ``get_output_embeddings()``; ``layers``: the module
  list the attention calls sit in (one ``fxbridge::attention`` call per layer, see ``tracer/attention_op.py``);
- ``attn``: the module that makes the call; ``q`` / ``k`` / ``v``: the Linear modules whose outputs reach the
  call's q / k / v inputs; ``o_proj``: the Linear that reads the call's output;
- norms are the modules whose region computes ``rsqrt`` (RMSNorm) or ``layer_norm``: ``ln1`` the one the q/k/v
  projections read, ``ln2`` the one that reads ``resid_mid`` (the add of the attention branch to the layer's input),
  ``ln1_post`` / ``ln2_post`` a norm between a branch's module and its residual add, ``final_norm`` the one
  ``lm_head`` reads; ``pos_embed`` an Embedding added to the token embedding before layer 0;
- the MLP: the Linears that read ``ln2``'s output are gate and up (gated: the one whose output reaches the down
  projection through an activation is the gate; plain: one input projection), the MLP module their parent, the
  down projection the Linear whose output is the MLP's output;
- ``rotary``: whether the q path from projection to attention call mixes in a value computed from the inputs
  (cos/sin of the positions); layers where it does not are NoPE layers (hook_attention finds them in the graph too).

Every layer must give the same relative paths. ``verify_inferred`` then runs a random batch through HF and the
traced module and checks, layer by layer, ``hook_resid_pre`` / ``hook_resid_post`` against the HF decoder layer's
input / output, the residual decomposition of HOOKS.md (``resid_mid = resid_pre + attn_out``, ``resid_post =
resid_mid + mlp_out``) and the logits; anything that cannot be located or does not verify is an
``UnsupportedArchitecture`` naming the layer and what diverged. Registered families never run any of this.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import fx

from ..errors import CaptureError, UnsupportedArchitecture, VerificationError
from ..tracer.attention_op import AttentionCall
from ..tracer.graph_facts import ModuleRegion, layer_index, module_stack
from ..passes import hook_final_softcap, remove_eval_dropout
from ..passes.hook_final_softcap import match_softcap
from .spec import DEFAULT_PASSES, ArchSpec

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.contiguous.default,
          aten.clone.default, aten._to_copy.default, aten.to.dtype, aten.alias.default, aten.type_as.default,
          aten.dropout.default}  # (captured in eval mode: dropout(train=False) is its input)
_ADDS = {aten.add.Tensor}
_MULS = {aten.mul.Tensor}


class InferenceFailed(Exception):
    """Raised inside inference with a readable reason; ``infer`` turns it into UnsupportedArchitecture."""


@dataclass
class Inferred:
    """What route 2 found: the spec, the capture it was read from (trace reuses it) and a readable summary."""

    spec: ArchSpec
    captured: object
    facts: list[str]

    def describe(self) -> str:
        return describe(self.spec, self.facts)


def describe(spec: ArchSpec, facts: list[str] | None = None) -> str:
    """The spec as readable text: module paths and layout facts."""
    lines = [f"spec {spec.family} (model_type {spec.model_type!r}, not registered):",
             f"embed {spec.embed}" + (f", pos_embed {spec.pos_embed}" if spec.pos_embed else "")
             + f", layers {spec.layers}.{{i}}, final_norm {spec.final_norm}, unembed {spec.unembed}",
             f"per layer: ln1 {spec.ln1}" + (f", ln1_post {spec.ln1_post}" if spec.ln1_post else "")
             + f", attn {spec.attn} (q {spec.q}, k {spec.k}, v {spec.v}, o {spec.o_proj})"
             + (f", ln2 {spec.ln2}" if spec.ln2 else "") + (f", ln2_post {spec.ln2_post}" if spec.ln2_post else "")
             + f", mlp {spec.mlp} (" + (f"gate {spec.mlp_gate}, " if spec.mlp_gate else "")
             + f"in {spec.mlp_in}, out {spec.mlp_out})",
             f"norm {spec.norm}, rotary {spec.rotary}"
             + f", {'parallel' if spec.parallel else 'sequential'} blocks"
             + (f", final softcap config.{spec.final_softcap_config}" if spec.final_softcap_config else "")]
    return "\n".join(lines + list(facts or ()))


# ----------------------------------------------------------------------------------------------- graph reading

class _Reader:
    def __init__(self, model, graph: fx.Graph, layers: str):
        self.model, self.graph, self.layers = model, graph, layers
        self.modules = dict(model.named_modules())
        self._regions: dict[str, ModuleRegion] = {}
        self._positional: dict[fx.Node, bool] = {}

    def region(self, path: str) -> ModuleRegion:
        if path not in self._regions:
            self._regions[path] = ModuleRegion.of(self.graph, path)
        return self._regions[path]

    def innermost(self, node: fx.Node) -> str | None:
        stack = module_stack(node)
        return stack[-1] if stack else None

    def is_linear(self, path: str | None) -> bool:
        mod = self.modules.get(path) if path is not None else None
        return mod is not None and (isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D")

    def norm_kind(self, path: str | None) -> str | None:
        """"rms" / "layernorm" where module ``path`` computes a normalisation, else None."""
        if path is None or path not in self.modules:
            return None
        kinds = set()
        for n in self.region(path).nodes:
            if n.target == aten.layer_norm.default:
                kinds.add("layernorm")
            elif n.target == aten.rsqrt.default or (n.target == aten.pow.Tensor_Scalar and n.args[1] == -0.5):
                kinds.add("rms")
        return kinds.pop() if len(kinds) == 1 else None

    def module_of_output(self, node: fx.Node, norm: bool = False) -> str | None:
        """The innermost module whose output ``node`` is, of one of its calls (``norm=True``: the innermost such
        norm module)."""
        for path in reversed(module_stack(node)):
            region = self.region(path)
            if node not in region or all(u in region for u in node.users):
                return None
            if not norm or self.norm_kind(path):
                return path
        return None

    def linear_sources(self, node: fx.Node, within: str) -> set[str]:
        """The Linear modules under ``within`` whose outputs reach ``node`` (walking up the use-def edges)."""
        found, seen, todo = set(), set(), [node]
        while todo:
            n = todo.pop()
            if n in seen or n.op in ("get_attr", "placeholder"):
                continue
            seen.add(n)
            path = self.innermost(n)
            if self.is_linear(path) and path.startswith(within + ".") and self.region(path).output is n:
                found.add(path)
                continue
            if within not in module_stack(n):
                continue
            todo.extend(n.all_input_nodes)
        return found

    def linear_readers(self, node: fx.Node, within: str) -> set[str]:
        """The Linear modules under ``within`` that read ``node`` (walking down the use-def edges)."""
        found, seen, todo = set(), set(), list(node.users)
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            path = self.innermost(n)
            if self.is_linear(path) and path.startswith(within + ".") and n in self.region(path):
                found.add(path)
                continue
            if within in module_stack(n):
                todo.extend(n.users)
        return found

    def output_through_views(self, node: fx.Node, norm: bool = False) -> str | None:
        """``module_of_output`` of ``node`` or, failing that, of what it views or casts."""
        while True:
            found = self.module_of_output(node, norm)
            if found is not None or not (node.op == "call_function" and node.target in _VIEWS):
                return found
            node = node.args[0]

    def strip(self, node: fx.Node) -> fx.Node:
        while node.op == "call_function" and node.target in _VIEWS and node.all_input_nodes:
            node = node.args[0]
        return node

    def positional(self, node: fx.Node) -> bool:
        """Whether ``node`` is computed from a graph input (a position-dependent value, not a weight/constant)."""
        todo, seen = [node], set()
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            if n.op == "placeholder":
                return True
            if n in self._positional:
                if self._positional[n]:
                    return True
                continue
            seen.add(n)
            todo.extend(n.all_input_nodes)
        self._positional[node] = False
        return False

    def rotated(self, start: fx.Node, end: fx.Node) -> bool:
        """Whether the path ``start`` -> ``end`` mixes in a position-dependent value (RoPE's cos/sin)."""
        down, todo = set(), [start]
        while todo:  # descendants of start
            n = todo.pop()
            if n in down:
                continue
            down.add(n)
            todo.extend(u for u in n.users if u <= end)
        chain, todo = set(), [end]
        while todo:  # ... that are ancestors of end
            n = todo.pop()
            if n in chain or n not in down:
                continue
            chain.add(n)
            todo.extend(n.all_input_nodes)
        return any(arg not in chain and _float_tensor(arg) and self.positional(arg)
                   for n in chain if n is not start for arg in n.all_input_nodes)


def _float_tensor(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _rel(path: str, base: str) -> str:
    if not path.startswith(base + "."):
        raise InferenceFailed(f"{path} is outside {base}")
    return path[len(base) + 1:]


def _norm_reading(r: _Reader, node: fx.Node, base: str, exclude: str | None = None) -> str | None:
    """The norm module under ``base`` that reads ``node`` (one of its users is inside it), if exactly one."""
    found = {p for u in node.users for p in module_stack(u)[::-1][:1]
             if p and p.startswith(base + ".") and p != exclude and r.norm_kind(p)}
    found = {p for p in found if r.region(p).output is not None}
    return found.pop() if len(found) == 1 else None


def _branch_end(r: _Reader, out: fx.Node, base: str, where: str) -> tuple[fx.Node, str | None]:
    """A branch's output as added to the residual: the module's output, or that of a norm reading it right after
    (eval-mode functional dropout after it looked through: remove_eval_dropout removes it)."""
    while len(out.users) == 1 and next(iter(out.users)).target == aten.dropout.default:
        out = next(iter(out.users))
    post = _norm_reading(r, out, base)
    if post is not None and r.region(post).inputs == (out,):
        return r.region(post).output, post
    return out, None


def _add_leaves(r: _Reader, node: fx.Node, keep: set) -> list[fx.Node]:
    """The summands of a tree of adds ending in ``node``, down to the values in ``keep`` (views looked through)."""
    leaves = [r.strip(node)]
    while len(leaves) < len(keep):
        adds = [k for k, leaf in enumerate(leaves)
                if leaf not in keep and leaf.target in _ADDS and len(leaf.all_input_nodes) == 2]
        if not adds:
            break
        leaf = leaves.pop(adds[0])
        leaves[adds[0]:adds[0]] = [r.strip(a) for a in leaf.all_input_nodes]
    return leaves


def _residual_add(r: _Reader, x: fx.Node, branch: fx.Node) -> fx.Node | None:
    """The add of ``branch`` to the residual ``x`` (HF's no-op dtype casts of the residual looked through)."""
    for u in branch.users:
        others = [a for a in u.all_input_nodes if a is not branch]
        if u.target in _ADDS and len(others) == 1 and r.strip(others[0]) is r.strip(x):
            return u
    return None


def _layer_facts(r: _Reader, i: int, call: AttentionCall) -> dict:
    base = f"{r.layers}.{i}"
    where = f"{base}"
    attn = r.innermost(call.node)
    if attn is None or not attn.startswith(base + "."):
        raise InferenceFailed(f"layer {i}: the attention call {call.node.name} is not inside a module of {base}")
    facts = {"attn": _rel(attn, base)}
    # q, k, v: the Linear whose output reaches each attention input
    projs = {}
    for role in ("q", "k", "v"):
        src = r.linear_sources(getattr(call, role), attn)
        if len(src) != 1:
            raise InferenceFailed(f"layer {i}: the attention call's {role} comes from {len(src)} projections "
                                  f"({', '.join(sorted(src)) or 'none'}) inside {attn}; expected one Linear")
        projs[role] = src.pop()
    if len(set(projs.values())) != 3:
        raise InferenceFailed(f"layer {i}: q, k and v come from one fused projection ({projs['q']}); inference "
                              "handles separate q/k/v projections only (a fused layout needs a registered spec)")
    facts.update({role: _rel(p, attn) for role, p in projs.items()})
    o = r.linear_readers(call.node, attn)
    if len(o) != 1:
        raise InferenceFailed(f"layer {i}: the attention output is read by {len(o)} projections in {attn} "
                              f"({', '.join(sorted(o)) or 'none'}); expected one output projection")
    facts["o_proj"] = _rel(o.pop(), attn)
    facts["rotary_here"] = r.rotated(r.region(projs["q"]).output, call.q)
    # ln1: the norm whose output the projections read
    ins = {n for p in projs.values() for n in r.region(p).inputs}
    if len(ins) != 1:
        raise InferenceFailed(f"layer {i}: q/k/v projections read {len(ins)} different values; expected one (ln1)")
    ln1_out = ins.pop()
    ln1 = r.module_of_output(ln1_out, norm=True)
    kind = r.norm_kind(ln1)
    if ln1 is None or not ln1.startswith(base + ".") or kind is None:
        raise InferenceFailed(f"layer {i}: q/k/v projections read {ln1_out.name} (from {ln1 or 'no module'}), "
                              "not the output of a norm inside the layer (rsqrt or layer_norm): no pre-norm ln1")
    facts["ln1"], facts["norm"] = _rel(ln1, base), kind
    outside = [n for n in r.region(ln1).inputs if n not in r.region(base)]
    if len(outside) != 1:
        raise InferenceFailed(f"layer {i}: ln1 {ln1} reads {len(outside)} values from outside {base}; expected the "
                              "residual stream")
    x = outside[0]
    # attention branch
    attn_out = r.region(attn).output
    attn_end, ln1_post = _branch_end(r, attn_out, base, where)
    facts["ln1_post"] = ln1_post and _rel(ln1_post, base)
    mid = _residual_add(r, x, attn_end)
    ln2 = _norm_reading(r, mid, base) if mid is not None else None
    if ln2 is not None and r.norm_kind(ln2) == kind:  # sequential: the MLP's norm reads resid_mid
        ln2_out = r.region(ln2).output
    else:  # parallel: the MLP reads ln1's output, or a norm of its own of resid_pre
        added, mid, ln2, ln2_out = mid is not None, None, None, ln1_out
        if not r.linear_readers(ln1_out, base) - set(projs.values()):
            ln2 = _norm_reading(r, x, base, exclude=ln1)
            if ln2 is None or r.norm_kind(ln2) != kind:
                raise InferenceFailed(
                    f"layer {i}: " + (f"the attention branch (hook_attn_out, {attn_end.name}) is not added to the "
                                      "layer's input (hook_resid_pre) by one add" if not added else
                                      f"no {kind} norm reads resid_mid (hook_resid_mid) = resid_pre + attn_out")
                    + ", and no norm of the layer's input feeds an MLP: neither a sequential nor a parallel block")
            ln2_out = r.region(ln2).output
    facts["parallel"] = mid is None
    facts["ln2"] = ln2 and _rel(ln2, base)
    readers = r.linear_readers(ln2_out, base) - set(projs.values())
    if not readers:
        raise InferenceFailed(f"layer {i}: no Linear reads ln2 ({ln2})'s output")
    mlp_paths = {p.rsplit(".", 1)[0] for p in readers}
    if len(mlp_paths) != 1 or mlp_paths == {base}:
        raise InferenceFailed(f"layer {i}: the Linears reading ln2 ({', '.join(sorted(readers))}) are not in one "
                              "MLP module")
    mlp = mlp_paths.pop()
    mlp_out = r.region(mlp).output
    down = {p for p in r.linear_sources(mlp_out, mlp)} if mlp_out is not None else set()
    if len(down) != 1 or r.region(down_p := next(iter(down))).output is not r.strip(mlp_out):
        raise InferenceFailed(f"layer {i}: the output of {mlp} is not one down projection's output")
    facts.update(mlp=_rel(mlp, base), mlp_out=_rel(down_p, mlp))
    down_in = r.region(down_p).inputs
    if len(down_in) != 1:
        raise InferenceFailed(f"layer {i}: {down_p} reads {len(down_in)} values; expected one")
    if len(readers) == 1:
        facts.update(mlp_gate=None, mlp_in=_rel(readers.pop(), mlp))
    elif len(readers) == 2:
        h = r.strip(down_in[0])
        if h.target not in _MULS or len(h.all_input_nodes) != 2:
            raise InferenceFailed(f"layer {i}: two projections read ln2, but {down_p} does not read their product")
        direct = [a for a in h.all_input_nodes if r.module_of_output(r.strip(a)) in readers]
        if len(direct) != 1:
            raise InferenceFailed(f"layer {i}: cannot tell gate from up in {mlp}: {len(direct)} of the product's "
                                  "factors are a projection output with no activation")
        up = r.module_of_output(r.strip(direct[0]))
        (gate,) = readers - {up}
        facts.update(mlp_gate=_rel(gate, mlp), mlp_in=_rel(up, mlp))
    else:
        raise InferenceFailed(f"layer {i}: {len(readers)} projections read ln2 ({', '.join(sorted(readers))}); "
                              "expected one (plain MLP) or two (gate and up)")
    mlp_end, ln2_post = _branch_end(r, mlp_out, base, where)
    facts["ln2_post"] = ln2_post and _rel(ln2_post, base)
    out = r.strip(r.region(base).output)
    if mid is not None:
        post = _residual_add(r, mid, mlp_end)
        if post is None:
            raise InferenceFailed(f"layer {i}: the MLP branch (hook_mlp_out, {mlp_end.name}) is not added to "
                                  "resid_mid by one add")
        if out is not post:
            raise InferenceFailed(f"layer {i}: the layer's output (hook_resid_post) is not resid_mid + the MLP "
                                  "branch (hook_resid_mid + hook_mlp_out)")
    elif set(_add_leaves(r, out, keep := {r.strip(n) for n in (x, attn_end, mlp_end)})) != keep:
        raise InferenceFailed(f"layer {i}: the layer's output (hook_resid_post) is not resid_pre + the attention "
                              "branch + the MLP branch (hook_resid_pre + hook_attn_out + hook_mlp_out)")
    facts["resid_pre"] = x
    return facts


def _final_softcap(r: _Reader, unembed: str, config) -> str | None:
    """The config attribute holding the final-logit softcap, where the logits go through ``cap * tanh(x / cap)``:
    the one whose value is the graph's cap (read from the graph, not from the name)."""
    x = r.region(unembed).output
    while True:
        found = match_softcap(x)
        views = [u for u in x.users if u.op == "call_function" and u.target in _VIEWS]
        if found is not None or len(x.users) != 1 or not views:
            break
        x = views[0]
    if found is None:
        return None
    cap = found[1]
    names = [k for k, v in config.to_dict().items() if isinstance(v, (int, float)) and not isinstance(v, bool)
             and abs(float(v) - cap) <= 1e-6 * max(abs(cap), 1.0) and "softcap" in k]
    if len(names) != 1:
        raise InferenceFailed(f"the logits are soft-capped at {cap}, and {len(names)} config softcap attributes "
                              f"hold that value ({', '.join(names) or 'none'})")
    return names[0]


def _layers_path(model) -> str:
    n = int(getattr(model.config, "num_hidden_layers", -1))
    lists = [p for p, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n
             and len({type(c) for c in m}) == 1]
    if not lists:
        raise InferenceFailed(f"no module list of {n} (config.num_hidden_layers) decoder layers")
    return lists[0]


def _path_of(model, module, what: str) -> str:
    for path, m in model.named_modules():
        if m is module and path:
            return path
    raise InferenceFailed(f"model.{what}() is not a submodule of the model")


@contextlib.contextmanager
def _eval(model):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def unsupported(model, reason: str) -> UnsupportedArchitecture:
    """The UnsupportedArchitecture for ``model`` whose spec could not be inferred or verified, saying why."""
    from . import supported_architectures
    return UnsupportedArchitecture(str(getattr(model.config, "model_type", None)), supported_architectures(),
                                   inferred_from=type(model).__name__, reason=reason)


def infer(model) -> Inferred:
    """Route 2: capture ``model`` and read an ArchSpec from its module tree and graph (not yet verified)."""
    from ..tracer import capture
    try:
        layers = _layers_path(model)
        embed = _path_of(model, model.get_input_embeddings(), "get_input_embeddings")
        unembed = _path_of(model, model.get_output_embeddings(), "get_output_embeddings")
        with _eval(model):
            try:
                captured = capture(model, layers=layers)
            except CaptureError as exc:  # e.g. a state-space model's recurrence: nothing an ArchSpec could describe
                raise InferenceFailed(f"torch.export could not capture it ({str(exc).splitlines()[0][:200]})") from None
        r = _Reader(model, captured.graph, layers)
        calls = {}
        for call in AttentionCall.find(captured.graph):
            i = layer_index(call.node, layers)
            if i is None or i in calls:
                raise InferenceFailed(f"attention call {call.node.name} is outside {layers}.* or a second one in its "
                                      "layer")
            calls[i] = call
        n = len(model.get_submodule(layers))
        if sorted(calls) != list(range(n)):
            missing = sorted(set(range(n)) - set(calls))
            raise InferenceFailed(f"layer {missing[0]} ({layers}.{missing[0]}) makes no attention call through "
                                  "transformers' AttentionInterface (attention written inline is not inferred)")
        per_layer = [_layer_facts(r, i, calls[i]) for i in range(n)]
        keys = [k for k in per_layer[0] if k not in ("rotary_here", "resid_pre")]
        for i, f in enumerate(per_layer[1:], 1):
            for k in keys:
                if f[k] != per_layer[0][k]:
                    raise InferenceFailed(f"layer {i} differs from layer 0 in {k}: {f[k]!r} vs {per_layer[0][k]!r}")
        # final norm: what lm_head reads
        head_in = r.region(unembed).inputs
        final = r.output_through_views(head_in[0], norm=True) if len(head_in) == 1 else None
        if final is None or r.norm_kind(final) is None:
            raise InferenceFailed(f"{unembed} does not read the output of a norm (no final norm)")
        # learned positions (an Embedding added to the token embedding) and a norm of the embeddings before layer 0
        emb_out, x0 = r.region(embed).output, per_layer[0]["resid_pre"]
        pos = emb_norm = None
        if r.strip(x0) is not emb_out and x0.target in _ADDS:
            others = [a for a in x0.all_input_nodes if r.strip(a) is not emb_out]
            pos = r.output_through_views(others[0]) if len(others) == 1 else None
            if pos is None or not isinstance(r.modules[pos], torch.nn.Embedding):
                raise InferenceFailed("layer 0 reads the token embedding plus something that is not a position "
                                      "Embedding")
        elif r.strip(x0) is not emb_out:
            emb_norm = r.output_through_views(x0, norm=True)
            if emb_norm is None or emb_out not in r.region(emb_norm).inputs:
                raise InferenceFailed(f"layer 0's residual input is not the token embedding ({embed}) output")
        # functional eval-mode dropout in the layers (Seed-OSS's residual dropout): removed by a pass first
        drops = [0] * n
        for node in captured.graph.find_nodes(op="call_function", target=aten.dropout.default):
            if (i := layer_index(node, layers)) is not None:
                drops[i] += 1
        if len(set(drops)) != 1:
            raise InferenceFailed(f"the layers call dropout different numbers of times ({drops})")
        passes = ((remove_eval_dropout(per_layer=drops[0]),) if drops[0] else ()) + DEFAULT_PASSES
        softcap = _final_softcap(r, unembed, model.config)
        if softcap:
            passes += (hook_final_softcap,)
        rotary = [f["rotary_here"] for f in per_layer]
        f0 = {k: per_layer[0][k] for k in keys}
        spec = ArchSpec(model_types=(str(model.config.model_type),), family=f"inferred from {type(model).__name__}",
                        layers=layers, embed=embed, pos_embed=pos, final_norm=final, unembed=unembed,
                        rotary=any(rotary), inferred=True, passes=passes,
                        final_softcap_config=softcap, **f0)
        facts = [f"read from {type(model).__name__}'s module tree and {len(calls)} attention calls"]
        if any(rotary) and not all(rotary):
            facts.append(f"NoPE layers {[i for i, v in enumerate(rotary) if not v]}: no hook_rot_q/k there "
                         "(hook_attention reads it from the graph)")
        if drops[0]:
            facts.append(f"{drops[0]} eval-mode dropout call(s) per layer, removed (remove_eval_dropout)")
        if emb_norm is not None:
            facts.append(f"the embeddings are normalised by {emb_norm} before layer 0 (blocks.0.hook_resid_pre is "
                         "after that norm)")
        return Inferred(spec.for_config(model.config), captured, facts)
    except InferenceFailed as exc:
        raise unsupported(model, f"could not infer a spec: {exc}") from None


def infer_spec(model) -> ArchSpec:
    """An ArchSpec for ``model`` inferred from its module tree and captured graph (whether or not its model_type is
    registered). Not verified: ``fxbridge.trace(model, spec=infer_spec(model))`` verifies it before using it."""
    return infer(model).spec


def verify_inferred(gm, model, *, seed: int = 0) -> dict[str, float]:
    """Check the traced module against HF layer by layer (see the module docstring); UnsupportedArchitecture
    naming the first layer and hook that diverged."""
    from ..runtime.names import hook_name
    from ..verify import TOLERANCE, _reference_attention, verify
    try:
        diffs = verify(gm, model, seed=seed)  # hook_resid_post vs HF layer outputs, then the logits
    except VerificationError as exc:
        raise unsupported(model, f"the inferred spec does not verify: {exc.where} diverges from HF "
                           f"(max diff {exc.max_diff:.3e} > {exc.tolerance:.1e})") from None
    spec, n = gm.spec, int(gm.dims["n_layers"])
    gen = torch.Generator().manual_seed(seed + 1)
    param = next(iter(model.parameters()))
    ids = torch.randint(0, int(gm.dims["d_vocab"]), (2, 7), generator=gen).to(param.device)
    inputs = [None] * n
    layers = model.get_submodule(spec.layers)
    handles = [layer.register_forward_pre_hook(lambda m, a, kw, i=i: inputs.__setitem__(i, (a or (kw.get(
        "hidden_states"),))[0].detach()), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with _reference_attention(model), torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids, attention_mask=torch.ones_like(ids))
    tol = TOLERANCE.get(param.dtype, 1e-4)
    for i in range(n):
        def get(short):
            return cache[hook_name(short, i)].float()
        pre, attn, mlp, post = get("hook_resid_pre"), get("hook_attn_out"), get("hook_mlp_out"), get("hook_resid_post")
        checks = [("hook_resid_pre", pre, inputs[i].float(), f"the input of HF {spec.layer(i)}")]
        if spec.parallel:
            checks.append(("hook_resid_post", post, pre + attn + mlp, "resid_pre + attn_out + mlp_out"))
        else:
            mid = get("hook_resid_mid")
            checks += [("hook_resid_mid", mid, pre + attn, "resid_pre + attn_out"),
                       ("hook_resid_post", post, mid + mlp, "resid_mid + mlp_out")]
        for short, ours, ref, what in checks:
            diff = (ours - ref).abs().max().item() if ours.shape == ref.shape else float("inf")
            bound = tol * (1.0 + ref.abs().max().item())
            diffs[f"{hook_name(short, i)} = {what}"] = diff
            if not diff <= bound:
                raise unsupported(model, f"the inferred spec does not verify: layer {i} ({spec.layer(i)}), "
                                   f"{hook_name(short, i)} != {what} (max diff {diff:.3e} > {bound:.1e})")
    return diffs


__all__ = ["Inferred", "describe", "infer", "infer_spec", "unsupported", "verify_inferred"]
