"""Depth-flat capture: capture two periods of decoder layers once, then repeat the layer subgraph for every layer.

torch.export traces Python op by op (a few ms per op on CPU), so a full capture costs time proportional to depth.
Decoder layers of one model run the same code, so fxbridge captures a *shallow* copy of the model instead:

    1. Give each layer a kind (its class, parameter names/shapes/dtypes, plain attributes of its submodules,
       its entries in per-layer config lists such as ``layer_types``); find the period p of the kinds.
    2. Build the same model class with 2p layers (on the meta device, then given the model's own weights) and
       capture it.
    3. Check that layer t and layer t+p captured to the same ops with the same constants (only the
       ``layer_idx`` of the attention op may differ) and read the same shared values (masks, rotary tables) --
       a layer whose code depends on its index (GPT-2's ``scale_attn_by_inverse_layer_idx``), a layer that
       reads another layer's values (KV sharing), or computation between layers makes stitching refuse.
    4. Emit prologue, then layer ``i`` as a copy of template ``i % p`` with its weights and module paths renamed
       to layer i, then the epilogue. get_attr nodes point into the real model, as in a full capture.

Any doubt returns None and the caller captures the whole model. ``FXBRIDGE_STITCH=0`` turns stitching off.
"""
from __future__ import annotations

import copy
import logging
import os
import time

import torch
from torch import fx

from .attention_op import AttentionCall
from .graph_facts import HF_ROOT, hf_path, hf_target, layer_index, relayer, relayer_meta

log = logging.getLogger(__name__)

_INDEX_ATTRS = ("layer_idx", "layer_index", "layer_id", "layer_number")


class _Refuse(Exception):
    """Stitching does not apply; the message says why (logged at debug level)."""


def enabled() -> bool:
    return os.environ.get("FXBRIDGE_STITCH", "1") not in ("0", "false", "no", "off")


def decoder_layers(model, path: str) -> torch.nn.ModuleList | None:
    """The decoder layers at ``path`` (the spec's ``layers``): a ModuleList of ``num_hidden_layers`` layers."""
    try:
        layers = model.get_submodule(path)
    except AttributeError:
        return None
    n = getattr(model.config, "num_hidden_layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) == n else None


def _simple(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def layer_kind(model, layers, i: int) -> tuple:
    """What makes layer i's captured code what it is, apart from its index."""
    layer = layers[i]
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in layer.named_parameters())
    buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in layer.named_buffers())
    attrs = tuple((name, k, v) for name, mod in layer.named_modules() for k, v in sorted(vars(mod).items())
                  if not k.startswith("_") and k not in _INDEX_ATTRS and _simple(v))
    config = model.config
    per_layer = tuple((k, repr(v[i])) for k, v in sorted(vars(config).items())
                      if isinstance(v, (list, tuple)) and len(v) == len(layers))
    return type(layer).__qualname__, params, buffers, attrs, per_layer


def period(kinds: list) -> int:
    for p in range(1, len(kinds) + 1):
        if all(kinds[i] == kinds[i % p] for i in range(len(kinds))):
            return p
    return len(kinds)


def shallow_model(model, n_layers: int, path: str):
    """The model's class with its first ``n_layers`` layers, built on the meta device and then given the model's own
    parameters and buffers (the same tensors, not copies), so constants the capture computes keep their values."""
    config = copy.deepcopy(model.config)
    total = config.num_hidden_layers
    for key, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == total:
            setattr(config, key, type(value)(value[:n_layers]))
    config.num_hidden_layers = n_layers
    with torch.device("meta"):
        shallow = type(model)(config)
    shallow.eval()
    for name, mod in shallow.named_modules():
        big = model.get_submodule(name)
        for table in ("_parameters", "_buffers"):
            for key, value in list(getattr(mod, table).items()):
                ref = getattr(big, table).get(key)
                if value is None and ref is None:
                    continue
                if value is None or ref is None or tuple(ref.shape) != tuple(value.shape):
                    raise _Refuse(f"{name}.{key} differs between the model and its shallow copy")
                getattr(mod, table)[key] = ref
    return shallow


def stitch(graph: fx.Graph, path: str, n_layers: int, p: int, device: torch.device,
           constants: dict | None = None) -> fx.Graph:
    """The graph of an ``n_layers`` model from ``graph``, a capture of the same model with 2p layers.
    ``constants``: the tensor constants the capture lifted onto its root, by get_attr target."""
    constants = {} if constants is None else constants  # gets the per-layer copies of layer-made constants
    layer = {n: layer_index(n, path) for n in graph.nodes}
    body = {k: [n for n in graph.nodes if layer[n] == k and n.op != "get_attr"] for k in range(2 * p)}
    outer = [n for n in graph.nodes if layer[n] is None]
    depends = set()  # outer nodes computed from some layer's output: the epilogue
    for n in graph.nodes:
        if layer[n] is not None and n.op != "get_attr" or any(a in depends for a in n.all_input_nodes):
            depends.add(n)
    last_layer_node = [n for n in graph.nodes if layer[n] is not None and n.op != "get_attr"][-1]
    after = set()  # outer nodes the capture placed after the last layer stay after it (e.g. the final norm)
    for n in reversed(graph.nodes):
        if n is last_layer_node:
            break
        after.add(n)
    depends |= after
    epilogue = [n for n in outer if n in depends and n.op != "output"]
    for n in outer:
        if n in depends and any(layer[u] is not None for u in n.users):
            raise _Refuse(f"{n.name} is computed between layers")
    outs = [_layer_output(body[k], layer, k) for k in range(2 * p)]
    carried0 = _check_periodic(body, layer, outs, p, path, constants)
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    attrs: dict[str, fx.Node] = {}

    def get_attr(target: str, like: fx.Node) -> fx.Node:
        if target not in attrs:
            with new.inserting_before(first_compute[0]) if first_compute else _nullctx():
                attrs[target] = new.get_attr(target)
            attrs[target].meta.update(like.meta)
        return attrs[target]

    first_compute: list[fx.Node] = []
    for n in graph.nodes:
        if layer[n] is None and n not in depends and n.op != "output":
            env[n] = new.node_copy(n, lambda a: env[a]) if n.op != "get_attr" else get_attr(n.target, n)
            if n.op not in ("placeholder", "get_attr") and not first_compute:
                first_compute.append(env[n])
    prev_out = env[carried0]
    for i in range(n_layers):
        t = i % p
        local: dict[fx.Node, fx.Node] = {}

        def arg(a: fx.Node, t=t, i=i, local=local):
            if a in local:
                return local[a]
            if a.op == "get_attr" and layer[a] == t:
                return get_attr(hf_target(relayer(hf_path(a.target), path, t, i)), a)
            if a.op == "get_attr" and a.target in constants and all(layer[u] == t for u in a.users):
                # a constant the layer makes: each layer gets its own, as in a full capture
                name = f"{a.target}_layer{i}"
                constants.setdefault(name, constants[a.target])
                return get_attr(name, a)
            if (t == 0 and a is carried0) or (t > 0 and a is outs[t - 1]):
                return prev_out
            return env[a]

        for n in body[t]:
            copied = new.node_copy(n, arg)
            copied.meta = relayer_meta(n.meta, path, t, i)
            if AttentionCall.is_op(copied):
                copied.args = AttentionCall.of(copied).with_layer(i).args
            local[n] = copied
        prev_out = local[outs[t]]
    last = outs[2 * p - 1]
    for n in epilogue + [graph.output_node()]:
        env[n] = new.node_copy(n, lambda a: prev_out if a is last else env[a])
    _fix_devices(new, device)
    return new


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _layer_output(nodes: list[fx.Node], layer: dict, k: int) -> fx.Node:
    outs = [n for n in nodes if any(layer[u] != k for u in n.users)]
    if len(outs) != 1:
        raise _Refuse(f"layer {k} hands {len(outs)} values on, expected 1")
    return outs[0]


def _check_periodic(body: dict, layer: dict, outs: list, p: int, path: str, constants: dict) -> fx.Node:
    """Layers t and t+p must match op for op; returns the value layer 0 reads as its incoming residual."""
    carried0 = None
    for t in range(p):
        a_nodes, b_nodes = body[t], body[t + p]
        if len(a_nodes) != len(b_nodes):
            raise _Refuse(f"layers {t} and {t + p} captured to {len(a_nodes)} and {len(b_nodes)} nodes")
        pos_a = {n: j for j, n in enumerate(a_nodes)}
        pos_b = {n: j for j, n in enumerate(b_nodes)}
        if pos_a[outs[t]] != pos_b[outs[t + p]]:
            raise _Refuse(f"layers {t} and {t + p} hand on different values")
        for a, b in zip(a_nodes, b_nodes):
            if a.op != b.op or a.target != b.target:
                raise _Refuse(f"layers {t} and {t + p} differ at {a.name} / {b.name}")
            flat_a, flat_b = _flat(_unlabelled(a), a.kwargs), _flat(_unlabelled(b), b.kwargs)
            if len(flat_a) != len(flat_b):
                raise _Refuse(f"{a.name} / {b.name} have different arguments")
            for j, (x, y) in enumerate(zip(flat_a, flat_b)):
                if isinstance(x, fx.Node) and isinstance(y, fx.Node):
                    carried0 = _same_source(x, y, t, p, layer, pos_a, pos_b, outs, carried0, path, constants)
                elif isinstance(x, fx.Node) or isinstance(y, fx.Node):
                    raise _Refuse(f"{a.name} / {b.name} differ in argument {j}")
                elif not _equal_const(x, y):
                    raise _Refuse(f"{a.name} / {b.name} differ in constant {x!r} / {y!r} (index-dependent code)")
    if carried0 is None:
        raise _Refuse("could not find the residual stream entering layer 0")
    return carried0


def _unlabelled(node: fx.Node) -> tuple:
    """The node's arguments, an attention call's layer index left out (the one constant layers may differ in)."""
    return AttentionCall.of(node).with_layer(-1).args if AttentionCall.is_op(node) else node.args


def _same_source(x, y, t, p, layer, pos_a, pos_b, outs, carried0, path, constants):
    if x in pos_a and y in pos_b:
        if pos_a[x] != pos_b[y]:
            raise _Refuse(f"layers {t} and {t + p} wire {x.name} / {y.name} differently")
        return carried0
    if x.op == "get_attr" and y.op == "get_attr" and layer[x] == t and layer[y] == t + p:
        if hf_target(relayer(hf_path(x.target), path, t, t + p)) != y.target:
            raise _Refuse(f"weights {x.target} / {y.target} differ")
        return carried0
    if y is outs[t + p - 1]:  # the residual stream coming in
        if t > 0 and x is outs[t - 1]:
            return carried0
        if t == 0 and layer[x] is None and carried0 in (None, x):
            return x
    if x is y and layer[x] is None:  # shared values: masks, rotary tables, position ids
        return carried0
    if _same_constant(x, y, layer, constants):  # per-layer copies of one constant (Falcon's index lists)
        return carried0
    raise _Refuse(f"layers {t} and {t + p} read {x.name} / {y.name}")


def _same_constant(x: fx.Node, y: fx.Node, layer: dict, constants: dict) -> bool:
    """x and y read two lifted tensor constants (on the capture's root) that are equal: a layer that builds a
    constant (Falcon indexes with a list, ``t[..., [-2], :]``) gets one per layer; the stitched layers share one.
    On the meta device values are unknown and only shape and dtype can be compared: a meta graph computes only
    shapes and dtypes, so it is no less exact for that."""
    if x.op != "get_attr" or y.op != "get_attr" or layer[x] is not None or layer[y] is not None:
        return False
    a, b = constants.get(x.target), constants.get(y.target)
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    return a.is_meta or bool(torch.equal(a, b))


def _flat(args, kwargs) -> list:
    out: list = []
    fx.node.map_aggregate((args, tuple(sorted(kwargs.items()))), lambda v: out.append(v) or v)
    return out


def _equal_const(x, y) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return False
    try:
        return type(x) is type(y) and bool(x == y)
    except Exception:
        return False


def _fix_devices(graph: fx.Graph, device: torch.device) -> None:
    """The shallow copy lives on the meta device; constants that name a device must name the model's."""
    if device.type == "meta":
        return

    def fix(v):
        return device if isinstance(v, torch.device) and v.type == "meta" else v

    for n in graph.nodes:
        n.args = fx.node.map_aggregate(n.args, fix)
        n.kwargs = fx.node.map_aggregate(n.kwargs, fix)


def _prologue_constants(root) -> dict[str, torch.Tensor]:
    """Tensor constants the capture lifted onto its root (transformers 5.17's mask code makes one; Falcon's layers
    make some). Layers re-emitted from a template read the template's constants (checked equal across periods)."""
    return dict(root.named_buffers(recurse=False))


def capture_stitched(model, path: str, export_model, unlift, *, batch: int, seq: int):
    """(root, graph, notes) of a depth-flat capture of ``model`` whose decoder layers are at ``path``, or None when
    stitching does not apply."""
    if not enabled():
        return None
    layers = decoder_layers(model, path)
    if layers is None:
        return None
    try:
        p = period([layer_kind(model, layers, i) for i in range(len(layers))])
        if 2 * p >= len(layers):
            return None
        start = time.perf_counter()
        shallow = shallow_model(model, 2 * p, path)
        shallow_layers = shallow.get_submodule(path)
        for j in range(2 * p):
            if layer_kind(shallow, shallow_layers, j) != layer_kind(model, layers, j):
                raise _Refuse(f"layer {j} of the shallow copy differs from the model's")
        ep = export_model(shallow, batch=batch, seq=seq)
        root, graph = unlift(ep, shallow)
        if any(name != HF_ROOT for name, _ in root.named_children()):
            raise _Refuse("the capture holds submodules of its own")
        constants = _prologue_constants(root)
        device = next((t.device for t in model.parameters()), torch.device("cpu"))
        graph = stitch(graph, path, len(layers), p, device, constants)
        graph.lint()
    except _Refuse as why:
        log.info("stitching %s does not apply (%s); capturing every layer", type(model).__name__, why)
        return None
    root = torch.nn.Module()
    root.add_module(HF_ROOT, model)
    for name, value in constants.items():
        root.register_buffer(name, value, persistent=False)
    note = f"stitched: captured {2 * p} of {len(layers)} layers (period {p}) in {time.perf_counter() - start:.1f}s"
    return root, graph, [note]
