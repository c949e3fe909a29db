"""Split a fused QKV projection into explicit, hooked ``hook_q`` [B,S,H,dh], ``hook_k`` / ``hook_v`` [B,S,Hkv,dh].

    qkv = query_key_value(x)                    qkv = query_key_value(x)
    <HF's own split: views, slices, index,  ->  q, k, v = split(qkv, layout)            (views of qkv)
     broadcast to H heads, transposes>          q' = hook_q(q) ; k' = hook_k(k) ; v' = hook_v(v)
    ... attention(q_hf, k_hf, v_hf)              ... attention(q'^T, repeat(k')^T, repeat(v')^T)

The layout is data (``ArchSpec.qkv_layout``: "contiguous", "per_head", "per_group"; the einops forms are in
``qkv_layouts.py``). The size check comes first: (H + 2*Hkv) * dh features or an error naming them.
HF's split is not pattern-matched op by op. Instead every tensor HF derives from the fused output by
shape-only ops is evaluated once on an index probe (a fused tensor whose entries are their own positions);
a node whose probe equals q, k or v of the layout -- as [B,S,h,d] or [B,h,S,d], K/V possibly repeated to H
heads group-major -- *is* that value, and is replaced by the same expression of the hooked q/k/v. So the
layout is verified against HF's code, and edits to a KV head reach exactly the query heads of its group.

Meta device: HF's ``x[..., [-2], :]`` becomes an index constant whose values a meta capture loses. Such a
constant (one integer, the only index of an ``index`` op) is then solved for by structure: the one attention
input (q, k or v) its branch reaches names its role, and the one slot of the indexed dim for which the probe of
that branch equals the role in the layout is taken as its value. The probe then runs, and the graph is rewritten,
exactly as on a real device; no role reached, several, or not exactly one such slot is an error.
"""
from __future__ import annotations

import logging

import sympy
import torch
from torch import fx
from torch.utils._pytree import tree_map

from ..runtime.names import hook_name
from ..tracer.attention_op import AttentionCall
from ..tracer.graph_facts import ModuleRegion, scoped_meta
from .base import NoMatch, PassContext, graph_pass
from .graph_utils import hook_after, output_of
from .qkv_layouts import layout_steps, split_eager

log = logging.getLogger(__name__)
aten = torch.ops.aten
_CONST_OPS = {aten.lift_fresh_copy.default, aten.clone.default, aten.detach.default}


def _forms(role: str, n_heads: int, n_kv: int) -> list[tuple[str, bool]]:
    """How HF may hold a role: (layout of dims, repeated to H heads)."""
    forms = [("bshd", False), ("bhsd", False)]
    if role != "q" and n_kv < n_heads:
        forms += [("bshd", True), ("bhsd", True)]
    return forms


def _apply_form(x: torch.Tensor, form: str, repeat: int) -> torch.Tensor:
    if repeat > 1:  # group-major, as repeat_interleave: head h reads KV head h // repeat
        x = x.unsqueeze(3).expand(-1, -1, -1, repeat, -1).flatten(2, 3)
    return x.transpose(1, 2) if form == "bhsd" else x


class _Probe:
    """Evaluates shape-only code on concrete index tensors; symbolic sizes bound from the fused output's shape."""

    def __init__(self, root, fused: fx.Node, assumed=None, probe_sizes=(2, 3)):
        shape = fused.meta["val"].shape
        self.root, self.binding, self.consts, self.meta_consts, concrete = root, {}, set(), [], []
        self.assumed = assumed or {}  # meta constant -> the values solved for by structure
        for size, probe_size in zip(shape[:-1], probe_sizes):
            if isinstance(size, torch.SymInt):
                self.binding[size.node.expr] = sympy.Integer(probe_size)
            concrete.append(int(probe_size) if isinstance(size, torch.SymInt) else int(size))
        n = int(shape[-1])
        self.env = {fused: torch.arange(concrete[0] * concrete[1] * n, dtype=torch.float64).reshape(*concrete, n)}

    def value(self, node: fx.Node, depth: int = 2):
        if node in self.env:
            return self.env[node]
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt):
            expr = sympy.sympify(sympy.sympify(val.node.expr).xreplace(self.binding))
            if expr.free_symbols:
                raise LookupError(f"size {val} of {node.name} is not a function of the fused output's shape")
            return int(expr)
        if isinstance(val, (int, float, bool)):
            return val
        if node.op == "get_attr":
            self.consts.add(node)
            if node in self.assumed:
                return self.assumed[node]
            value = _fetch(self.root, node.target)
            if isinstance(value, torch.Tensor) and value.is_meta:
                self.meta_consts.append(node)
                raise LookupError(f"constant {node.target} was captured on the meta device: its values are lost")
            return value
        if node.op == "call_function" and node.target in _CONST_OPS and depth > 0:
            self.consts.add(node)
            return node.target(*tree_map(lambda a: self.value(a, depth - 1) if isinstance(a, fx.Node) else a,
                                         node.args))
        raise LookupError(f"{node.name} is not computed from the fused output alone")

    def run(self, node: fx.Node):
        args, kwargs = tree_map(lambda a: self.value(a) if isinstance(a, fx.Node) else a, (node.args, node.kwargs))
        return node.target(*args, **kwargs)


def _fetch(root, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _check_size(fused: fx.Node, layout: str, dims: dict, what: str) -> None:
    n = int(fused.meta["val"].shape[-1])
    h, g, d = dims["n_heads"], dims["n_kv_heads"], dims["d_head"]
    if n != (h + 2 * g) * d:
        raise NoMatch(what, f"(H + 2*Hkv)*dh = {(h + 2 * g) * d} output features for qkv_layout {layout!r} with "
                      f"H={h}, Hkv={g}, dh={d} (sizes [H*dh, Hkv*dh, Hkv*dh] = [{h * d}, {g * d}, {g * d}])",
                      f"{n} output features")


def _match_region(fused, probe, candidates, attn_path) -> list[tuple[fx.Node, tuple]]:
    """HF nodes derived from ``fused`` by shape-only code whose probe equals a candidate (nearest ones only)."""
    matches = []
    for node in ModuleRegion.of(fused.graph, attn_path).nodes:  # graph order; nodes before fused read nothing of it
        if node.op != "call_function" or not any(a in probe.env for a in node.all_input_nodes):
            continue
        try:
            out = probe.run(node)
        except Exception:  # not shape-only code (reads other tensors): a consumer, not part of the split
            continue
        if isinstance(out, (tuple, list)):
            probe.env[node] = out
            continue
        if not isinstance(out, torch.Tensor):
            continue
        hit = next((key for key, cand in candidates.items() if cand.shape == out.shape and torch.equal(cand, out)),
                   None)
        if hit is None:
            probe.env[node] = out
        else:
            matches.append((node, hit))
    return matches


_CLAMPS = {torch.ops.aten.clamp.default, torch.ops.aten.clip.default}


def _clamped(fused: fx.Node) -> fx.Node:
    """The fused output through a clamp that is its only reader (MPT ``clip_qkv``): hook_q/k/v see what attention
    reads, and the layout probe runs on the split alone (a clamp would change the probe's index values)."""
    users = list(fused.users)
    return users[0] if len(users) == 1 and users[0].target in _CLAMPS else fused


def split_layer(ctx: PassContext, layer: int) -> int:
    """Split and hook one layer's fused projection; returns the number of hooks made (3)."""
    spec, dims, graph = ctx.spec, ctx.dims, ctx.graph
    attn_path = spec.layer(layer, spec.attn)
    qkv_path = spec.layer(layer, f"{spec.attn}.{spec.qkv}")
    fused = _clamped(output_of(graph, qkv_path, "the fused projection's output"))
    _check_size(fused, spec.qkv_layout, dims, qkv_path)
    h, g, d = dims["n_heads"], dims["n_kv_heads"], dims["d_head"]
    probe = _Probe(ctx.root, fused)
    canon = split_eager(probe.env[fused], spec.qkv_layout, h, g, d)
    candidates = {(role, form, rep): _apply_form(canon[role], form, h // g if rep else 1)
                  for role in "qkv" for form, rep in _forms(role, h, g)}
    matches = _match_region(fused, probe, candidates, attn_path)
    found_roles = {key[0] for _, key in matches}
    solver = None
    while found_roles != set("qkv") and probe.meta_consts:  # each turn solves one more meta constant
        solver = solver or _MetaSolver(ctx, fused, canon, candidates, attn_path, qkv_path)
        probe, matches = solver.solve(probe)
        found_roles = {key[0] for _, key in matches}
    if solver:
        solver.check(matches)
    if found_roles != set("qkv"):
        raise NoMatch(qkv_path, f"HF's split to produce q, k, v in the {spec.qkv_layout!r} layout (H={h}, Hkv={g}, "
                      f"dh={d}; is qkv_layout right?)", f"it does not produce {sorted(set('qkv') - found_roles)}")
    hooked = _insert_split(ctx, fused, layer, attn_path, qkv_path)
    exprs: dict[tuple, fx.Node] = {}
    for node, key in matches:
        if key not in exprs:
            exprs[key] = _emit_form(graph, hooked[key[0]], key[1], h // g if key[2] else 1, node)
        node.replace_all_uses_with(exprs[key])
    _erase_dead(graph, [*probe.env, *(node for node, _ in matches), *probe.consts], keep=fused)
    stray = [u.name for u in fused.users if u.meta.get("fxbridge_pass") != "split_fused_qkv"]
    if stray:
        raise NoMatch(qkv_path, "its output read only through the layout's split", f"HF still reads it through {stray}")
    return 3


class _MetaSolver:
    """Values for index constants a meta capture lost, from the attention input (role) each one's branch reaches."""

    def __init__(self, ctx, fused, canon, candidates, attn_path, qkv_path):
        self.root, self.fused, self.canon, self.candidates = ctx.root, fused, canon, candidates
        self.attn_path, self.where = attn_path, f"HF's split of {qkv_path} (meta device)"
        self.region = ModuleRegion.of(fused.graph, attn_path)
        cores = [n for n in self.region.nodes if AttentionCall.is_op(n) or AttentionCall.is_core(n)]
        if len(cores) != 1:
            raise NoMatch(self.where, "one attention call to tell q, k, v apart by (HF indexes with constants whose "
                          "values a meta capture does not keep; or trace this model on a real device)",
                          f"{len(cores)} attention calls")
        self.core, self.assumed, self.roles = cores[0], {}, {}

    def solve(self, probe: _Probe):
        """Solve the first meta constant the probe met; returns the probe and matches run with it assumed."""
        const = probe.meta_consts[0]
        index, dim = self._index_use(const)
        role, reached = self._role(const)
        x = probe.env.get(index.args[0])
        if x is None:
            raise NoMatch(self.where, f"{index.args[0].name}, indexed by {index.name}, computed from the fused output "
                          "alone (to solve the constant it indexes with)", "it is not")
        fits = torch.isin(x, self.canon[role]).movedim(dim, 0).flatten(1).all(1)  # slots holding only role values
        val = const.meta["val"]
        solved = []
        for slot in fits.nonzero().flatten().tolist():
            assumed = {**self.assumed, const: torch.full(val.shape, slot, dtype=val.dtype)}
            trial = _Probe(self.root, self.fused, assumed)
            matches = _match_region(self.fused, trial, self.candidates, self.attn_path)
            if {key[0] for node, key in matches if node in reached} == {role}:
                solved.append((slot, assumed, trial, matches))
        if len(solved) != 1:
            raise NoMatch(self.where, f"one slot of dim {dim} of {index.args[0].name} making {index.name} (it reaches "
                          f"attention input {role}) {role} of the layout, to solve constant {const.target}",
                          f"{len(solved)} slots {[s[0] for s in solved]}")
        slot, self.assumed, trial, matches = solved[0]
        self.roles[const] = (role, reached)
        log.debug("%s: constant %s solved as [%d] (%s)", self.where, const.target, slot, role)
        return trial, matches

    def check(self, matches) -> None:
        """Every solved constant's branch is matched, and only as the role its structure gave."""
        for const, (role, reached) in self.roles.items():
            got = {key[0] for node, key in matches if node in reached}
            if got != {role}:
                raise NoMatch(self.where, f"the branch of {const.target} matched as attention input {role}, which "
                              "it reaches", f"matched as {sorted(got)}")

    def _index_use(self, const: fx.Node) -> tuple[fx.Node, int]:
        """The one index op reading ``const`` (through copies) in the region, and the dim it indexes."""
        val, prev = const.meta.get("val"), const
        while isinstance(val, torch.Tensor) and val.numel() == 1 and not val.is_floating_point():
            users = [u for u in prev.users if u in self.region]
            if len(users) != 1 or users[0].op != "call_function":
                break
            node = users[0]
            if node.target in _CONST_OPS:
                prev = node
                continue
            dims = [i for i, a in enumerate(node.args[1]) if a is not None] if node.target == aten.index.Tensor else []
            if dims and len(dims) == 1 and node.args[1][dims[0]] is prev and node.args[0] is not prev:
                return node, dims[0]
            break
        raise NoMatch(self.where, f"the constant {const.target} (values lost on meta) read as the one-element index of "
                      "one index op (or trace this model on a real device)", "another use")

    def _role(self, const: fx.Node) -> tuple[str, set]:
        """The attention input (q, k or v) the constant's branch reaches, and the tensors of that branch."""
        reached, seen, todo = set(), set(), [const]
        while todo:
            node = todo.pop()
            for user in node.users:
                if isinstance(user.meta.get("val"), (torch.SymInt, int, float, bool)):
                    continue  # a size read off the branch is not the branch
                if user is self.core:
                    reached |= AttentionCall.of(user).roles_of(node)
                elif user not in self.region:
                    raise NoMatch(self.where, f"the branch of constant {const.target} read only inside "
                                  f"{self.attn_path} (to tell its role)", f"{user.name} outside it reads {node.name}")
                elif user not in seen:
                    seen.add(user)
                    todo.append(user)
        if len(reached) != 1 or not reached <= set("qkv"):
            raise NoMatch(self.where, f"the branch of constant {const.target} reaching exactly one of attention inputs "
                          "q, k, v", f"it reaches {sorted(reached)}")
        return reached.pop(), seen


def _insert_split(ctx, fused, layer, attn_path, qkv_path) -> dict[str, fx.Node]:
    graph, dims = ctx.graph, ctx.dims
    unflat, parts = layout_steps(ctx.spec.qkv_layout, dims["n_heads"], dims["n_kv_heads"], dims["d_head"])
    meta = scoped_meta(fused, attn_path)
    with graph.inserting_after(fused):
        grid = graph.call_function(aten.unflatten.int, (fused, *unflat))
    _tag(grid, meta)
    hooked, last = {}, grid
    for role, steps in parts.items():
        x = grid
        for op, args in steps:
            with graph.inserting_after(last):
                x = last = graph.call_function(op, (x, *args))
            _tag(x, meta)
        last = hooked[role] = hook_after(ctx, x, hook_name(f"attn.hook_{role}", layer), scope=attn_path, users=[],
                                         hf_module=qkv_path)
    return hooked


def _emit_form(graph, x, form: str, repeat: int, before: fx.Node) -> fx.Node:
    meta = scoped_meta(x, None)
    with graph.inserting_before(before):
        if repeat > 1:
            x = _tag(graph.call_function(aten.unsqueeze.default, (x, 3)), meta)
            x = _tag(graph.call_function(aten.expand.default, (x, [-1, -1, -1, repeat, -1])), meta)
            x = _tag(graph.call_function(aten.flatten.using_ints, (x, 2, 3)), meta)
        if form == "bhsd":
            x = _tag(graph.call_function(aten.transpose.int, (x, 1, 2)), meta)
    return x


def _tag(node: fx.Node, meta: dict) -> fx.Node:
    node.meta.update({k: dict(v) if isinstance(v, dict) else v for k, v in meta.items()})
    node.meta["fxbridge_pass"] = "split_fused_qkv"
    return node


def _erase_dead(graph, nodes, keep: fx.Node) -> None:
    """Erase HF's split nodes (and the constants only they read) once nothing reads them any more."""
    candidates = set(nodes)
    for node in reversed(list(graph.nodes)):
        if node in candidates and node is not keep and not node.users:
            graph.erase_node(node)


@graph_pass(expects=lambda spec, dims: 3 * dims["n_layers"])
def split_fused_qkv(ctx: PassContext) -> int:
    """Split fused QKV projections by the spec's layout into hook_q / hook_k / hook_v."""
    return sum(split_layer(ctx, layer) for layer in range(ctx.dims["n_layers"]))
