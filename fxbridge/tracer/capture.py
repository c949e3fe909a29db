"""HF causal LM -> flat torch.fx GraphModule whose parameters are the HF model's own.

``torch.fx.symbolic_trace`` fails on transformers-v5 models; ``torch.export.export(strict=False)`` captures
them (DESIGN.md). The exported program lifts parameters and buffers to placeholders; ``capture`` turns them
back into ``get_attr`` nodes that point into the HF model (``hf.<fqn>``), so nothing is copied and the
module stays tied to the HF weights. Batch and sequence are dynamic dims, so one capture serves every shape.
Each node keeps ``meta["nn_module_stack"]`` (the HF module path it came from), which the passes use.

Depth: when the decoder layers are of a few kinds, only two layers of each kind are captured and the rest is
stitched (stitch.py); otherwise every layer is captured. ``Captured.notes`` says which happened.

Meta device: a model built under ``torch.device("meta")`` traces like any other (no weight is materialised),
which gives the graph and hook table of a large model in seconds. The traced module then holds meta weights:
it runs on meta tensors (shapes and dtypes only). The graph bakes the capture device into a few constants
(``arange(..., device=meta)``), so after materialising the weights (``to_empty`` + ``load_state_dict``),
trace the model again on its real device.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.export.graph_signature import InputKind, OutputKind

from ..errors import CaptureError
from .attention_op import capture_attention
from .graph_facts import HF_ROOT, hf_target
from .stitch import capture_stitched

log = logging.getLogger(__name__)

INPUTS = ("input_ids", "attention_mask", "position_ids")

# Ops that only check metadata at runtime; the graph is already specialised on what they check.
_RUNTIME_ASSERTS = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
}


@dataclass
class Captured:
    """What ``capture`` returns: the graph (rooted at a module holding the HF model) and how it was made."""

    root: torch.nn.Module
    graph: fx.Graph
    seconds: float
    example_shape: tuple[int, int]
    notes: list[str] = field(default_factory=list)
    # "arange" / "mask": the graph takes position_ids, and HF's forward, given none, uses 0..S-1 for every row /
    # the mask-derived positions (OPT); None: the graph takes no position_ids (see probe_default_positions)
    default_positions: str | None = None


def _example_inputs(model, batch: int, seq: int):
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    device = _model_device(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(vocab, 2), (batch, seq), generator=gen).to(device)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    return ids, mask


def takes_position_ids(model) -> bool:
    """Whether the model's forward takes ``position_ids`` (Bloom and MPT do not: ALiBi reads the mask)."""
    return "position_ids" in inspect.signature(model.forward).parameters


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 2:
            return value
    return None


@contextlib.contextmanager
def _no_cache(config):
    """``config.use_cache = False`` while exporting: a forward that takes ``use_cache`` only through ``**kwargs``
    (GraniteMoE) reads the config's default and would return a DynamicCache torch.export cannot output."""
    had, old = hasattr(config, "use_cache"), getattr(config, "use_cache", None)
    config.use_cache = False
    try:
        yield
    finally:
        if had:
            config.use_cache = old
        else:
            del config.use_cache


def _dispatch_as_eager(graph: fx.Graph) -> None:
    """Where HF picks a kernel at run time and picks differently while torch.export traces, call HF's dispatcher.

    HF's fused experts (``transformers.integrations.moe._grouped_mm``) use torch's native ``grouped_mm`` kernel in
    eager mode where the device and torch allow it, but take their Python-loop fallback op while compiling or
    exporting (``is_torchdynamo_compiling``): the captured graph holds the fallback. The traced module calls the
    dispatcher instead, so it makes the choice HF's own forward makes (same values; HF's speed)."""
    try:
        from transformers.integrations import moe
        fallback = torch.ops.transformers.grouped_mm_fallback.default
    except (ImportError, AttributeError, RuntimeError):  # a transformers without fused experts
        return
    dispatch = getattr(moe, "_grouped_mm", None)
    if dispatch is None:
        return
    for node in graph.find_nodes(op="call_function", target=fallback):
        node.target = dispatch


def export_model(model, *, batch: int = 2, seq: int = 7, positions: bool = True):
    """torch.export the model's forward(input_ids, attention_mask, position_ids, use_cache=False) with dynamic B, S.

    ``position_ids`` is a graph input where the forward takes one (and ``positions``): left-padded batches then run
    with the mask-derived positions HF's ``generate`` and TransformerLens give them; the traced module passes HF's
    default (``arange``) when the caller gives none.

    Batch and sequence are named dims first. A model that slices a buffer of max_positions rows by the sequence
    length (GPT-Neo's causal bias, MPT's ALiBi table) makes export guard on the sequence length (``seq != max``)
    and reject the named dim ("Constraints violated"); it is then exported with dynamic-dim hints over the same
    ranges, which accept such guards (the slices in the graph are still symbolic: every length runs).
    """
    ids, mask = _example_inputs(model, batch, seq)
    max_seq = _max_positions(model.config)
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if positions and takes_position_ids(model):
        kwargs["position_ids"] = torch.arange(seq, device=ids.device).unsqueeze(0).repeat(batch, 1)
    if "use_cache" in inspect.signature(model.forward).parameters:  # OpenAI GPT has no cache (and no argument)
        kwargs["use_cache"] = False

    def dynamic(b_dim, s_dim):
        dyn = {name: {0: b_dim, 1: s_dim} for name in INPUTS if name in kwargs}
        return dict(dyn, use_cache=None) if "use_cache" in kwargs else dyn

    b_dim = torch.export.Dim("batch", min=1, max=1 << 16)
    s_dim = torch.export.Dim("seq", min=1, max=max_seq) if max_seq else torch.export.Dim("seq", min=1)
    hints = torch.export.Dim.DYNAMIC(min=1, max=1 << 16), torch.export.Dim.DYNAMIC(min=1, max=max_seq)
    with capture_attention(model), _no_cache(model.config), torch.no_grad():
        try:
            try:
                return torch.export.export(model, (), kwargs, dynamic_shapes=dynamic(b_dim, s_dim), strict=False)
            except Exception as exc:  # noqa: BLE001 -- torch.export's UserError; anything else is re-raised below
                if "Constraints violated" not in str(exc):
                    raise
                log.info("export guarded the sequence length (%s); exporting with dynamic-dim hints",
                         str(exc).splitlines()[1].strip() if "\n" in str(exc) else exc)
                return torch.export.export(model, (), kwargs, dynamic_shapes=dynamic(*hints), strict=False)
        except Exception as exc:  # torch.export raises many types; re-raise one that names the model
            raise CaptureError(
                f"torch.export could not capture {type(model).__name__} "
                f"(model_type={getattr(model.config, 'model_type', '?')!r}): {type(exc).__name__}: {exc}"
            ) from exc


def _unlift(ep, model) -> tuple[torch.nn.Module, fx.Graph]:
    """Rebuild the exported graph with get_attr nodes into the HF model instead of lifted placeholders."""
    root = torch.nn.Module()
    root.add_module(HF_ROOT, model)
    src = ep.graph_module
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    specs = {spec.arg.name: spec for spec in ep.graph_signature.input_specs if hasattr(spec.arg, "name")}
    n_const = 0
    for node in src.graph.nodes:
        if node.op == "placeholder":
            spec = specs.get(node.name)
            if spec is None or spec.kind == InputKind.USER_INPUT:
                if node.name in INPUTS:
                    env[node] = graph.placeholder(node.name)
                    env[node].meta.update(node.meta)
                continue  # use_cache and other constant user inputs vanish
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                new = graph.get_attr(hf_target(spec.target))
            else:  # lifted tensor constants: keep them on the root, not in the HF model
                name = f"_const_{n_const}"
                n_const += 1
                value = ep.constants[spec.target]
                if isinstance(value, torch.Tensor):
                    root.register_buffer(name, value, persistent=False)
                else:
                    setattr(root, name, value)
                new = graph.get_attr(name)
            new.meta.update(node.meta)
            env[node] = new
        elif node.op == "output":
            outs = node.args[0]
            user = [o for o, spec in zip(outs, ep.graph_signature.output_specs) if spec.kind == OutputKind.USER_OUTPUT]
            if not user:
                raise CaptureError("the exported program has no user output (expected the logits)")
            graph.output(env[user[0]])
        elif node.op == "call_function" and node.target in _RUNTIME_ASSERTS:
            continue
        else:
            if node.op == "get_attr":  # higher-order-op submodules (e.g. rotary under no_grad)
                setattr(root, node.target, getattr(src, node.target))
            new = graph.node_copy(node, lambda n: env[n])
            env[node] = new
    _skip_chained_noop_casts(graph)
    graph.eliminate_dead_code()
    return root, graph


_CASTS = {torch.ops.aten.to.dtype_layout, torch.ops.aten.to.dtype, torch.ops.aten.to.device}


def _noop_cast(node: fx.Node) -> bool:
    """``x.to(...)`` that returns x itself (same dtype, device and layout, no copy requested)."""
    if node.op != "call_function" or node.target not in _CASTS or node.kwargs.get("copy") \
            or not isinstance(node.args[0], fx.Node):
        return False
    out, inp = node.meta.get("val"), node.args[0].meta.get("val")
    return (isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor) and out.dtype == inp.dtype
            and out.device == inp.device and out.layout == inp.layout and out.shape == inp.shape)


def _skip_chained_noop_casts(graph: fx.Graph) -> None:
    """A no-op cast of a no-op cast reads the original value. ``x.to(device)`` returns x itself, so HF code that
    casts a shared value in every layer (Llama 4's ``position_embeddings.to(q.device)``) is captured as layer i+1's
    cast reading layer i's; reading the original keeps the layers independent (stitching needs that)."""
    for node in graph.nodes:
        if _noop_cast(node):
            src = node.args[0]
            while _noop_cast(src):
                src = src.args[0]
            if src is not node.args[0]:
                node.replace_input_with(node.args[0], src)


@contextlib.contextmanager
def replaced_forwards(model, forwards):
    """While inside, the model's module classes named in ``forwards`` ((class name, forward) pairs, the spec's
    ``capture_forwards``) run the given forward; the classes get their own back afterwards."""
    wanted = dict(forwards)
    classes = {type(m) for m in model.modules() if type(m).__name__ in wanted}
    missing = set(wanted) - {c.__name__ for c in classes}
    if missing:
        raise CaptureError(f"the spec replaces the forward of {sorted(missing)} during capture, but "
                           f"{type(model).__name__} has no such module")
    saved = {cls: cls.__dict__.get("forward") for cls in classes}
    try:
        for cls in classes:
            cls.forward = wanted[cls.__name__]
        yield
    finally:
        for cls, fwd in saved.items():
            if fwd is None:
                del cls.forward
            else:
                cls.forward = fwd


def probe_default_positions(model) -> str | None:
    """What HF's forward uses for positions when it is given none, on a left-padded batch: "arange" (0..S-1 in every
    row: most families), "mask" (each row counts its unmasked tokens: OPT), or None where the forward takes no
    ``position_ids`` (Bloom, MPT) or neither matches. A meta model cannot run: "arange" is assumed there."""
    if not takes_position_ids(model):
        return None
    device = _model_device(model)
    if device.type == "meta":
        return "arange"
    from ..runtime.forward import counted_positions
    ids, mask = _example_inputs(model, 2, 5)
    mask[1, :2] = 0  # the second row left-padded by two
    kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad():
        run = lambda **kw: model(input_ids=ids, attention_mask=mask, **kwargs, **kw).logits.float()
        default = run()
        scale = max(float(default.nan_to_num().abs().max()), 1.0)
        for mode, positions in (("arange", torch.arange(5, device=device).expand(2, 5)),
                                ("mask", counted_positions(mask))):
            try:  # every position, the padded ones too (OPT's pads sit at -1 + its offset)
                same = torch.allclose(default, run(position_ids=positions), rtol=1e-3, atol=1e-4 * scale,
                                      equal_nan=True)
            except (IndexError, RuntimeError):  # positions this family's forward rejects
                same = False
            if same:
                return mode
    log.info("%s: HF's default positions are neither 0..S-1 nor mask-derived; capturing without position_ids",
             type(model).__name__)
    return None


def capture(model, *, layers: str | None, batch: int = 2, seq: int = 7, forwards=()) -> Captured:
    """Capture ``model`` into a graph whose get_attr nodes point at the model's own parameters.

    ``layers`` is the path of the decoder layers (the spec's ``layers``): their repetition is what stitching uses;
    None captures every layer. ``forwards``: the spec's ``capture_forwards`` (see ``replaced_forwards``).
    """
    start = time.perf_counter()
    with replaced_forwards(model, forwards):
        positions = probe_default_positions(model)
        try:
            root, graph, notes = _capture_graph(model, layers, batch, seq, positions is not None)
        except CaptureError:
            if positions is None:
                raise
            log.info("capture with position_ids as an input failed; capturing without it")
            positions = None
            root, graph, notes = _capture_graph(model, layers, batch, seq, False)
    _dispatch_as_eager(graph)
    seconds = time.perf_counter() - start
    log.info("captured %s in %.1fs (%d nodes; %s)", type(model).__name__, seconds, len(graph.nodes), notes[0])
    return Captured(root=root, graph=graph, seconds=seconds, example_shape=(batch, seq), notes=notes,
                    default_positions=positions)


def _capture_graph(model, layers, batch: int, seq: int, positions: bool):
    export = functools.partial(export_model, positions=positions)
    stitched = None if layers is None else capture_stitched(model, layers, export, _unlift, batch=batch, seq=seq)
    if stitched is not None:
        return stitched
    root, graph = _unlift(export(model, batch=batch, seq=seq), model)
    return root, graph, ["captured every layer"]

