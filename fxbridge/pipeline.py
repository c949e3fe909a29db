"""``fxbridge.trace``: capture, rewrite, and wrap an HF causal LM into a HookedGraphModule (the whole pipeline)."""
from __future__ import annotations

import inspect
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from .architectures import dims_from_config, get_spec
from .errors import InferredSpecWarning, PatternNotFound, UnsupportedArchitecture, UnsupportedModel, UsageError
from .passes import PassContext, PassResult, run_passes
from .runtime.module import HookedGraphModule
from .tracer import capture


@dataclass
class TraceReport:
    """How a module was traced: capture time, passes with match counts, total time."""

    model_type: str
    capture_seconds: float
    passes: list[PassResult] = field(default_factory=list)
    total_seconds: float = 0.0
    capture_notes: list[str] = field(default_factory=list)  # e.g. "stitched: captured 2 of 26 layers (period 1)"
    inferred_spec: str | None = None  # the spec inferred for an unregistered model_type, as text (infer.describe)

    def __str__(self) -> str:
        lines = [f"{self.model_type}: traced in {self.total_seconds:.2f}s (capture {self.capture_seconds:.2f}s)"]
        lines += [f"  {note}" for note in self.capture_notes]
        if self.inferred_spec:
            lines += [f"  {line}" for line in self.inferred_spec.splitlines()]
        lines += [f"  {r.name:<18} {r.matches:>4} matches  {r.seconds * 1000:7.1f} ms" for r in self.passes]
        return "\n".join(lines)


def _progress_printer(enabled: bool):
    if not enabled:
        return None
    start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[fxbridge {time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)
    return say


def trace(model: torch.nn.Module, *, tokenizer=None, progress: bool = False, use_attn_result: bool = False,
          verify: bool = False, spec=None) -> HookedGraphModule:
    """Capture ``model`` (a transformers-v5 ``*ForCausalLM``) into a hookable GraphModule sharing its weights.

    The capture is of inference: the model runs in eval mode while it is captured (dropout is off) and gets its
    own train/eval modes back afterwards; it is otherwise unchanged. Torch module hooks on the model are refused
    (they would be baked into the graph); hooks added to the HF model after ``trace()`` never reach the graph.
    ``progress=True`` prints what is happening to stderr (capture takes seconds to tens of seconds).
    ``use_attn_result=True`` adds ``blocks.{i}.attn.hook_result`` [B,S,H,D] (each head's output before the sum; it
    costs B*S*H*D memory and a slower output projection, as TransformerLens's ``use_attn_result``).
    ``verify=True`` runs random tokens through both and raises ``VerificationError`` naming the first layer whose
    ``hook_resid_post`` differs from the HF decoder layer's output (see ``fxbridge.verify``).

    A ``model_type`` with no registered spec gets one inferred from the model (``architectures/infer.py``), verified
    against HF layer by layer, announced by an ``InferredSpecWarning`` and shown in ``gm.report``; one that cannot
    be inferred or does not verify raises ``UnsupportedArchitecture`` naming the layer and what diverged.
    ``spec=`` traces with that ArchSpec instead of the registered one (an inferred spec is verified likewise).
    ``tokenizer=`` (a transformers tokenizer) is set with ``gm.set_tokenizer``: string input, ``to_tokens`` and the
    rest of TransformerLens's tokenizer API then work (``fxbridge.from_pretrained`` loads both).
    """
    check_traceable(model)
    start = time.perf_counter()  # an inferred spec's capture and verification count too
    inferred = None
    if spec is None:
        try:
            spec = get_spec(model)
        except UnsupportedArchitecture as exc:
            if exc.missing:
                raise
            from .architectures.infer import infer
            inferred = infer(model)
            spec = inferred.spec
    check_lm_head(model, spec)
    if use_attn_result and spec.no_attn_result:
        raise ValueError(f"use_attn_result=True is not available for {spec.family} ({spec.model_type}): "
                         f"{spec.no_attn_result}")
    dims = dims_from_config(model.config, spec)
    say = _progress_printer(progress)
    modes = {m: m.training for m in model.modules()}
    param = next(iter(model.parameters()), None)
    try:
        model.eval()
        if say:
            say(f"capturing {type(model).__name__} ({dims['n_layers']} layers) with torch.export ...")
        captured = inferred.captured if inferred is not None else capture(
            model, layers=spec.layers, forwards=spec.capture_forwards)
        if say:
            say(f"captured {len(captured.graph.nodes)} nodes in {captured.seconds:.1f}s; rewriting")
        ctx = PassContext(captured.graph, captured.root, spec, dims, model.config)
        try:
            results = run_passes(ctx, spec.pipeline(use_attn_result=use_attn_result), progress=say)
        except PatternNotFound as exc:
            if not spec.inferred:
                raise
            from .architectures.infer import unsupported
            raise unsupported(model, f"the inferred spec does not fit the graph: {exc}") from None
        report = TraceReport(spec.model_type, captured.seconds, results, capture_notes=list(captured.notes))
        if spec.inferred:
            from .architectures.infer import describe
            report.inferred_spec = inferred.describe() if inferred is not None else describe(spec)
        gm = HookedGraphModule(captured.root, captured.graph, spec=spec, dims=dims, report=report,
                               options={"use_attn_result": use_attn_result},
                               traced_dtype=param.dtype if param is not None and param.is_floating_point() else None,
                               traced_on_meta=param is not None and param.device.type == "meta",
                               default_positions=captured.default_positions)
        if spec.inferred:
            import warnings

            from .architectures.infer import verify_inferred
            verify_inferred(gm, model)
            warnings.warn(InferredSpecWarning(
                f"fxbridge has no spec for model_type={model.config.model_type!r}: traced {type(model).__name__} with "
                f"a spec inferred from the model and verified against it on a random batch (see gm.report)"),
                stacklevel=2)
        if tokenizer is not None:
            gm.set_tokenizer(tokenizer)
        report.total_seconds = time.perf_counter() - start
        if say:
            say(f"done: {len(gm.hook_dict)} hook points")
        if verify:
            from .verify import verify as verify_against_hf
            verify_against_hf(gm, model)
            if say:
                say("verified against the HF model: every layer's output and the logits agree")
    finally:
        for module, training in modes.items():
            module.training = training
    return gm


def check_traceable(model) -> None:
    """Refuse, in one line naming what was passed and what to pass instead, what ``trace()`` cannot capture."""
    if isinstance(model, HookedGraphModule):
        raise UsageError("trace() got a module fxbridge already traced: use it as it is, copy.deepcopy(gm) for an "
                         "independent one, or trace its HF model again with fxbridge.trace(gm.hf)")
    if isinstance(model, (str, os.PathLike)):
        raise UnsupportedModel(
            f"trace() takes a model object, not the {type(model).__name__} {str(model)!r}: load it first with "
            f"transformers.AutoModelForCausalLM.from_pretrained({str(model)!r}), or from the shell run "
            f"`fxbridge inspect {model}`")
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModel(f"trace() takes a transformers *ForCausalLM model, got a {type(model).__name__}")
    from transformers import PreTrainedModel
    config = getattr(model, "config", None)
    if not isinstance(model, PreTrainedModel):
        if getattr(config, "model_type", None):
            raise UnsupportedModel(
                f"trace() needs the transformers model itself, got a {type(model).__name__} wrapping a "
                f"{config.model_type!r} model: pass the inner *ForCausalLM (for a PEFT model: "
                "model.merge_and_unload(), or model.base_model.model)")
        raise UnsupportedModel(f"trace() takes a transformers *ForCausalLM model, got the nn.Module "
                               f"{type(model).__name__} (no HF config)")
    if "forward" in vars(model):
        patched = vars(model)["forward"]
        sig = _signature(patched)
        raise UnsupportedModel(
            f"{type(model).__name__}.forward was replaced on the instance (forward{sig}); fxbridge captures the "
            "class's forward: remove the patch (del model.forward) and express the change as an fxbridge hook")
    _refuse_module_hooks(model)


def _signature(fn) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(...)"


def _refuse_module_hooks(model: torch.nn.Module) -> None:
    """Torch forward / pre-forward / backward hooks present at capture time would be baked into the graph and stay
    there after ``handle.remove()``: refuse, naming the module and the hook."""
    from torch.nn.modules import module as torch_module
    kinds = (("forward hook", "_forward_hooks"), ("forward pre-hook", "_forward_pre_hooks"),
             ("backward hook", "_backward_hooks"), ("backward pre-hook", "_backward_pre_hooks"))
    for path, sub in model.named_modules():
        for kind, attr in kinds:
            for fn in (getattr(sub, attr, None) or {}).values():
                where = f"model.{path}" if path else "the model"
                raise UsageError(
                    f"{where} ({type(sub).__name__}) has a torch {kind} {_fn_name(fn)}: trace() would bake it into "
                    "the graph, where handle.remove() no longer reaches it. Remove it before trace() and attach the "
                    "same function as an fxbridge hook (gm.add_hook(name, fn)) instead")
    for kind, attr in (("forward hook", "_global_forward_hooks"), ("forward pre-hook", "_global_forward_pre_hooks"),
                       ("backward hook", "_global_backward_hooks"),
                       ("backward pre-hook", "_global_backward_pre_hooks")):
        for fn in (getattr(torch_module, attr, None) or {}).values():
            raise UsageError(f"a global torch module {kind} {_fn_name(fn)} is registered: trace() would bake it "
                             "into the graph. Remove it before trace()")


def _fn_name(fn) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(type(fn), "__qualname__", repr(fn))
    return f"{name!r}"


def check_lm_head(model, spec) -> None:
    """A base model (``LlamaModel``) or another head class has the family's type but no LM head: name the class."""
    try:
        model.get_submodule(spec.unembed)
    except AttributeError:
        causal = _causal_lm_class(spec, model.config)
        raise UnsupportedModel(
            f"{type(model).__name__} has no language-model head ({spec.unembed!r}); fxbridge traces causal LMs: "
            f"pass {causal or 'the *ForCausalLM class of this family'} (e.g. "
            f"{causal or 'AutoModelForCausalLM'}.from_pretrained(...))") from None


def _causal_lm_class(spec, config) -> str | None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None))
