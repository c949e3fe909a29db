"""Depth-flat capture: capture two layers of each kind once, then copy the layer subgraph for every layer.

torch.export traces Python op by op (a few ms per op on CPU), so a full capture costs time proportional to depth.
Decoder layers of one model run the same code, so fxbridge captures a *shallow* copy of the model instead:

    1. Give each layer a kind (its class, parameter names/shapes/dtypes, plain attributes of its submodules,
       its entries in per-layer config lists such as ``layer_types``) and pick the first two layers of every kind
       (``sample``): sliding and full layers in any pattern give four, a layer unlike all others (Gemma 4's last
       layer of each type) is taken as it is.
    2. Build the same model class with only those layers (per-layer config lists and index-keyed
       ``per_layer_config`` cut down; on the meta device, then given the model's own weights) and capture it.
    3. Check that the two captured layers of each kind are the same ops with the same constants (only the
       ``layer_idx`` of the attention op may differ) and read the same shared values (masks, rotary tables), and
       that no layer reads another layer's values -- a layer whose code depends on its index (GPT-2's
       ``scale_attn_by_inverse_layer_idx``), a layer that reads another layer's values (KV sharing), per-layer
       values computed outside the layers (Gemma 4's per-layer inputs change shape with depth) or computation
       between layers makes stitching refuse; so does a layer class that occurs only once.
    4. Emit prologue, then layer ``i`` as a copy of the first captured layer of its kind with its weights and
       module paths renamed to layer i, then the epilogue. get_attr nodes point into the real model, as in a full
       capture; tensor constants a layer makes (Falcon's index lists) get one copy per layer.

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
    n = len(layers)
    per_layer = tuple((k, i in v) if _layer_indices(k, v, n) else (k, repr(v[i]))
                      for k, v in sorted(vars(config).items())
                      if isinstance(v, (list, tuple)) and (len(v) == n or _layer_indices(k, v, n)))
    return type(layer).__qualname__, params, buffers, attrs, per_layer


def sample(kinds: list) -> list[int]:
    """The layers to capture: the first two of every kind (a kind seen once: that layer), in depth order.

    Every layer of the model is then a copy of the first captured layer of its kind, and the second one of each
    kind checks that the copy is exact. Sliding and full layers in any pattern (5 : 1 included) need four layers;
    a tail of layers unlike the rest (Gemma 4's last layer of each type, which stores its k/v) is captured as it is.
    """
    seen: dict = {}
    chosen = []
    for i, kind in enumerate(kinds):
        if seen.get(kind, 0) < 2:
            seen[kind] = seen.get(kind, 0) + 1
            chosen.append(i)
    return chosen


def _index_keyed(value, n: int) -> bool:
    """A dict keyed by layer index (``per_layer_config`` of transformers' heterogeneous configs)."""
    if not isinstance(value, dict) or not value:
        return False
    try:
        return all(0 <= int(k) < n for k in value)
    except (TypeError, ValueError):
        return False


def shallow_config(config, chosen: list[int]):
    """``config`` with only the layers ``chosen``: per-layer lists and index-keyed dicts cut down and renumbered."""
    total = config.num_hidden_layers
    if any(_index_keyed(v, total) for v in config.to_dict().values()):
        data = config.to_dict()  # derived per-layer state: rebuild the config from its serialised form
        for key, value in list(data.items()):
            if _layer_indices(key, value, total):  # a list of layer indices (Llama 4's moe_layers): renumbered
                data[key] = [j for j, i in enumerate(chosen) if i in value]
            elif isinstance(value, list) and len(value) == total:
                data[key] = [value[i] for i in chosen]
            elif _index_keyed(value, total):
                keys = {int(k): k for k in value}
                data[key] = {type(keys[i])(j): value[keys[i]] for j, i in enumerate(chosen) if i in keys}
        data["num_hidden_layers"] = len(chosen)
        try:
            shallow = type(config).from_dict(data)
            shallow._attn_implementation = config._attn_implementation
        except Exception as exc:  # noqa: BLE001 -- any failure: no stitching
            raise _Refuse(f"the config could not be rebuilt with {len(chosen)} layers: {exc}") from exc
        return shallow
    shallow = copy.deepcopy(config)
    for key, value in list(vars(shallow).items()):
        if _layer_indices(key, value, total):  # a list of layer indices (Llama 4's moe_layers): renumbered
            setattr(shallow, key, type(value)(j for j, i in enumerate(chosen) if i in value))
        elif isinstance(value, (list, tuple)) and len(value) == total:
            setattr(shallow, key, type(value)(value[i] for i in chosen))
    shallow.num_hidden_layers = len(chosen)
    return shallow


def _layer_indices(key: str, value, n: int) -> bool:
    """A config list naming some layers by index (Llama 4's ``moe_layers``): a name with "layer" in it, strictly
    increasing ints in [0, n). A per-layer list of flags or sizes is not strictly increasing (all of 0..n-1 reads
    the same either way); the shallow copy's layer kinds are checked against the model's afterwards, so a misread
    list refuses stitching."""
    return ("layer" in key and isinstance(value, (list, tuple)) and 0 < len(value)
            and all(type(v) is int for v in value)
            and all(0 <= a < b < n for a, b in zip(value, value[1:])) and 0 <= value[0] < n
            and (len(value) < n or list(value) == list(range(n))))


def shallow_model(model, chosen: list[int], path: str):
    """The model's class with only the layers ``chosen``, built on the meta device and then given the model's own
    parameters and buffers (the same tensors, not copies), so constants the capture computes keep their values."""
    config = shallow_config(model.config, chosen)
    try:
        with torch.device("meta"):
            shallow = type(model)(config)
    except Exception as exc:  # noqa: BLE001 -- e.g. a count of KV-shared layers the cut-down config cannot have
        raise _Refuse(f"the model class cannot be built with layers {chosen}: {type(exc).__name__}: {exc}") from exc
    shallow.eval()
    with torch.device("meta"):
        fresh = type(model)(model.config)  # a fresh build at full depth: what the config alone gives each module
    for name, mod in shallow.named_modules():
        real = _real_path(name, path, chosen)
        big, built = model.get_submodule(real), fresh.get_submodule(real)
        # plain attributes set on the model after it was built (model.logit_scale = 0.5) are not in its config:
        # the shallow copy would capture the config's value, so refuse where one differs from a fresh full-depth
        # build (attributes derived from the depth, e.g. Gemma 4's first KV-shared layer, are equal there)
        for key, value in vars(big).items():
            if key.startswith("_") or key == "training" or not _simple(value):
                continue
            if key in vars(built) and vars(built)[key] != value:
                raise _Refuse(f"{name or 'the model'}.{key} is {value!r} on the model but {vars(built)[key]!r} in a "
                              "fresh build (set after construction)")
        for table in ("_parameters", "_buffers"):
            for key, value in list(getattr(mod, table).items()):
                ref = getattr(big, table).get(key)
                if value is None and ref is None:
                    continue
                if value is None or ref is None or tuple(ref.shape) != tuple(value.shape):
                    raise _Refuse(f"{name}.{key} differs between the model and its shallow copy")
                getattr(mod, table)[key] = ref
    return shallow


def _real_path(name: str, path: str, chosen: list[int]) -> str:
    j = layer_index(name, path)
    return name if j is None else relayer(name, path, j, chosen[j])


def stitch(graph: fx.Graph, path: str, kinds: list, chosen: list[int], device: torch.device,
           constants: dict | None = None) -> fx.Graph:
    """The graph of the model whose layer kinds are ``kinds`` from ``graph``, a capture of its layers ``chosen``
    (``sample(kinds)``; captured layer j is layer ``chosen[j]``). ``constants``: the tensor constants the capture
    lifted onto its root, by get_attr target (it gets the per-layer copies of constants the layers make)."""
    constants = {} if constants is None else constants
    m = len(chosen)
    layer = {n: layer_index(n, path) for n in graph.nodes}
    _read_shared_values_directly(graph, layer)
    _hoist_sizes(graph, layer)
    body = {k: [n for n in graph.nodes if layer[n] == k and n.op != "get_attr"] for k in range(m)}
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
    outs = [_layer_output(body[k], layer, k) for k in range(m)]
    first: dict = {}  # kind -> the captured layer every layer of that kind is copied from
    pairs = []  # (first, second) captured layers of one kind: they must match
    for j, i in enumerate(chosen):
        if kinds[i] in first:
            pairs.append((first[kinds[i]], j))
        else:
            first[kinds[i]] = j
    carried0 = _check_pairs(body, layer, outs, pairs, path, constants)
    _check_reads(body, layer, outs, carried0, depends)
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
    for i, kind in enumerate(kinds):
        t = first[kind]
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
    last = outs[m - 1]
    for n in epilogue + [graph.output_node()]:
        env[n] = new.node_copy(n, lambda a: prev_out if a is last else env[a])
    _fix_devices(new, device)
    return new


def _hoist_sizes(graph: fx.Graph, layer: dict) -> None:
    """Symbolic sizes a layer computes from the inputs' sizes alone (``B*S`` tokens in an MoE block) belong to no
    layer: torch.export computes each once, where first needed, and later layers read it from there. They are
    treated as prologue values (so each layer copy reads the same one)."""
    for n in graph.nodes:
        if layer[n] is not None and n.op == "call_function" and isinstance(n.meta.get("val"), (torch.SymInt, int)) \
                and all(layer[a] is None for a in n.all_input_nodes):
            layer[n] = None


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


def _check_pairs(body: dict, layer: dict, outs: list, pairs: list, path: str, constants: dict) -> fx.Node:
    """Captured layers a and b of one kind must match op for op; returns the value layer 0 reads as its incoming
    residual."""
    carried0 = None
    for a, b in pairs:
        a_nodes, b_nodes = body[a], body[b]
        if len(a_nodes) != len(b_nodes):
            raise _Refuse(f"layers {a} and {b} captured to {len(a_nodes)} and {len(b_nodes)} nodes")
        pos_a = {n: j for j, n in enumerate(a_nodes)}
        pos_b = {n: j for j, n in enumerate(b_nodes)}
        if pos_a[outs[a]] != pos_b[outs[b]]:
            raise _Refuse(f"layers {a} and {b} hand on different values")
        for x_node, y_node in zip(a_nodes, b_nodes):
            if x_node.op != y_node.op or x_node.target != y_node.target:
                raise _Refuse(f"layers {a} and {b} differ at {x_node.name} / {y_node.name}")
            flat_a, flat_b = _flat(_unlabelled(x_node), x_node.kwargs), _flat(_unlabelled(y_node), y_node.kwargs)
            if len(flat_a) != len(flat_b):
                raise _Refuse(f"{x_node.name} / {y_node.name} have different arguments")
            for j, (x, y) in enumerate(zip(flat_a, flat_b)):
                if isinstance(x, fx.Node) and isinstance(y, fx.Node):
                    carried0 = _same_source(x, y, a, b, layer, pos_a, pos_b, outs, carried0, path, constants)
                elif isinstance(x, fx.Node) or isinstance(y, fx.Node):
                    raise _Refuse(f"{x_node.name} / {y_node.name} differ in argument {j}")
                elif not _equal_const(x, y):
                    raise _Refuse(f"{x_node.name} / {y_node.name} differ in constant {x!r} / {y!r} "
                                  "(index-dependent code)")
    if carried0 is None:
        carried0 = _residual_into_layer0(body, layer, outs)
    if carried0 is None:
        raise _Refuse("could not find the residual stream entering layer 0 (the first layer's kind occurs once)")
    return carried0


def _residual_into_layer0(body: dict, layer: dict, outs: list) -> fx.Node | None:
    """Where layer 0's kind occurs once (dense layers before MoE ones), its incoming residual is the one value from
    before the layers it reads that has its output's shape and dtype (a layer maps [B,S,D] to [B,S,D])."""
    out = outs[0].meta.get("val")
    if not isinstance(out, torch.Tensor):
        return None
    reads = {a for n in body[0] for a in n.all_input_nodes if layer[a] is None and a.op != "get_attr"}
    like = [a for a in reads if isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].dtype == out.dtype
            and tuple(map(str, a.meta["val"].shape)) == tuple(map(str, out.shape))]
    return like[0] if len(like) == 1 else None


_CASTS = {torch.ops.aten.to.dtype_layout, torch.ops.aten.to.dtype, torch.ops.aten.to.device}


def _noop_cast(node: fx.Node) -> bool:
    """``x.to(...)`` that changes nothing (same dtype, device, shape; no copy asked): torch returns ``x`` itself."""
    if node.op != "call_function" or node.target not in _CASTS or not node.args:
        return False
    if node.kwargs.get("copy") or node.kwargs.get("memory_format") not in (None, torch.preserve_format):
        return False
    if node.target is torch.ops.aten.to.dtype and len(node.args) > 2 or node.target is torch.ops.aten.to.device \
            and len(node.args) > 3:
        return False
    src, val = node.args[0], node.meta.get("val")
    ref = src.meta.get("val") if isinstance(src, fx.Node) else None
    return (isinstance(val, torch.Tensor) and isinstance(ref, torch.Tensor) and val.dtype == ref.dtype
            and val.device == ref.device and val.layout == ref.layout and tuple(val.shape) == tuple(ref.shape))


def _read_shared_values_directly(graph: fx.Graph, layer: dict) -> None:
    """A layer that casts a shared value to what it already is (DeepSeek V2: ``freqs_cis.to(q.device)``) gets the
    same tensor back, and torch.export records the next layer's cast as reading this layer's result: the same value.
    Such reads from another layer go to the value itself, so every layer reads only its own nodes and shared ones."""
    for node in list(graph.nodes):
        if layer[node] is None or not _noop_cast(node):
            continue
        for user in list(node.users):
            if layer[user] == layer[node]:
                continue
            src = node.args[0]
            while layer[src] not in (None, layer[user]) and _noop_cast(src):
                src = src.args[0]
            user.replace_input_with(node, src)


def _check_reads(body: dict, layer: dict, outs: list, carried0: fx.Node, depends: set) -> None:
    """Every captured layer, the ones captured once included, reads only its own values and weights, the layer
    before's output, and values computed before the first layer (masks, rotary tables): no other layer's values."""
    for t, nodes in body.items():
        incoming = carried0 if t == 0 else outs[t - 1]
        for n in nodes:
            for a in n.all_input_nodes:
                if a is incoming or layer[a] == t or (layer[a] is None and a not in depends):
                    continue
                raise _Refuse(f"layer {t} reads {a.name} of layer {layer[a]}")


def _unlabelled(node: fx.Node) -> tuple:
    """The node's arguments, an attention call's layer index left out (the one constant layers may differ in)."""
    return AttentionCall.of(node).with_layer(-1).args if AttentionCall.is_op(node) else node.args


def _same_source(x, y, a, b, layer, pos_a, pos_b, outs, carried0, path, constants):
    if x in pos_a and y in pos_b:
        if pos_a[x] != pos_b[y]:
            raise _Refuse(f"layers {a} and {b} wire {x.name} / {y.name} differently")
        return carried0
    if x.op == "get_attr" and y.op == "get_attr" and layer[x] == a and layer[y] == b:
        if hf_target(relayer(hf_path(x.target), path, a, b)) != y.target:
            raise _Refuse(f"weights {x.target} / {y.target} differ")
        return carried0
    if y is outs[b - 1]:  # the residual stream coming in
        if a > 0 and x is outs[a - 1]:
            return carried0
        if a == 0 and layer[x] is None and carried0 in (None, x):
            return x
    if x is y and layer[x] is None:  # shared values: masks, rotary tables, position ids
        return carried0
    if _same_constant(x, y, layer, constants):  # per-layer copies of one constant (Falcon's index lists)
        return carried0
    raise _Refuse(f"layers {a} and {b} read {x.name} / {y.name}")


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
    make some). Each re-emitted layer gets its own copy of the constants its template makes (checked equal between
    the two captured layers of a kind)."""
    return dict(root.named_buffers(recurse=False))


def _shallow_of_kinds(model, kinds: list, chosen: list[int], path: str):
    """(shallow model, layers it holds): the layers ``chosen``, or where a config rule that depends on the layer index
    builds other kinds there (DeepSeek's ``first_k_dense_replace``: layers below it dense, MoE above), the shortest
    prefix of the layers holding the same -- a prefix keeps every index rule."""
    tries = [chosen]
    prefix = list(range(max(chosen) + 1))
    if prefix != chosen and len(prefix) < len(kinds):
        tries.append(prefix)
    why = None
    for layers in tries:
        try:
            shallow = shallow_model(model, layers, path)
        except (_Refuse, AttributeError) as exc:  # a submodule of the model missing from the shallow copy
            why = _Refuse(f"the shallow copy with layers {layers} does not match the model: {exc}")
            continue
        shallow_layers = shallow.get_submodule(path)
        bad = [(j, i) for j, i in enumerate(layers) if layer_kind(shallow, shallow_layers, j) != kinds[i]]
        if not bad:
            return shallow, layers
        why = _Refuse(f"layer {bad[0][0]} of the shallow copy differs from the model's layer {bad[0][1]}")
    raise why


def capture_stitched(model, path: str, export_model, unlift, *, batch: int, seq: int):
    """(root, graph, notes) of a depth-flat capture of ``model`` whose decoder layers are at ``path``, or None when
    stitching does not apply."""
    if not enabled():
        return None
    layers = decoder_layers(model, path)
    if layers is None:
        return None
    try:
        kinds = [layer_kind(model, layers, i) for i in range(len(layers))]
        chosen = sample(kinds)
        if len(chosen) >= len(layers):
            return None
        checked = {kinds[i][0] for i in chosen if kinds.count(kinds[i]) > 1}
        once = [i for i in chosen if kinds.count(kinds[i]) == 1 and kinds[i][0] not in checked]
        if once:  # a layer class never seen twice: nothing shows that its code ignores its index
            raise _Refuse(f"layer {once[0]} is the only one of its class")
        start = time.perf_counter()
        shallow, chosen = _shallow_of_kinds(model, kinds, chosen, path)
        ep = export_model(shallow, batch=batch, seq=seq)
        root, graph = unlift(ep, shallow)
        if any(name != HF_ROOT for name, _ in root.named_children()):
            raise _Refuse("the capture holds submodules of its own")
        constants = _prologue_constants(root)
        device = next((t.device for t in model.parameters()), torch.device("cpu"))
        graph = stitch(graph, path, kinds, chosen, device, constants)
        graph.lint()
    except _Refuse as why:
        log.info("stitching %s does not apply (%s); capturing every layer", type(model).__name__, why)
        return None
    root = torch.nn.Module()
    root.add_module(HF_ROOT, model)
    for name, value in constants.items():
        root.register_buffer(name, value, persistent=False)
    note = (f"stitched: captured {len(chosen)} of {len(layers)} layers ({len(set(kinds))} layer kinds) "
            f"in {time.perf_counter() - start:.1f}s")
    return root, graph, [note]
