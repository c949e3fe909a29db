"""``fxbridge.trace``: capture, rewrite, and wrap an HF causal LM into a HookedGraphModule (the whole pipeline)."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from .architectures import dims_from_config, get_spec
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

    def __str__(self) -> str:
        lines = [f"{self.model_type}: traced in {self.total_seconds:.2f}s (capture {self.capture_seconds:.2f}s)"]
        lines += [f"  {note}" for note in self.capture_notes]
        lines += [f"  {r.name:<18} {r.matches:>4} matches  {r.seconds * 1000:7.1f} ms" for r in self.passes]
        return "\n".join(lines)


def _progress_printer(enabled: bool):
    if not enabled:
        return None
    start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[fxbridge {time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)
    return say


def trace(model: torch.nn.Module, *, progress: bool = False, use_attn_result: bool = False,
          verify: bool = False) -> HookedGraphModule:
    """Capture ``model`` (a transformers-v5 ``*ForCausalLM``) into a hookable GraphModule sharing its weights.

    The model is put in eval mode (the capture is of inference; dropout is off) and is otherwise unchanged.
    ``progress=True`` prints what is happening to stderr (capture takes seconds to tens of seconds).
    ``use_attn_result=True`` adds ``blocks.{i}.attn.hook_result`` [B,S,H,D] (each head's output before the sum; it
    costs B*S*H*D memory and a slower output projection, as TransformerLens's ``use_attn_result``).
    ``verify=True`` runs random tokens through both and raises ``VerificationError`` naming the first layer whose
    ``hook_resid_post`` differs from the HF decoder layer's output (see ``fxbridge.verify``).
    """
    spec = get_spec(model)
    dims = dims_from_config(model.config, spec)
    say = _progress_printer(progress)
    start = time.perf_counter()
    model.eval()
    if say:
        say(f"capturing {type(model).__name__} ({dims['n_layers']} layers) with torch.export ...")
    captured = capture(model, layers=spec.layers)
    if say:
        say(f"captured {len(captured.graph.nodes)} nodes in {captured.seconds:.1f}s; rewriting")
    ctx = PassContext(captured.graph, captured.root, spec, dims, model.config)
    results = run_passes(ctx, spec.pipeline(use_attn_result=use_attn_result), progress=say)
    report = TraceReport(spec.model_type, captured.seconds, results, capture_notes=list(captured.notes))
    gm = HookedGraphModule(captured.root, captured.graph, spec=spec, dims=dims, aliases=ctx.aliases, report=report)
    report.total_seconds = time.perf_counter() - start
    if say:
        say(f"done: {len(gm.hook_dict)} hook points")
    if verify:
        from .verify import verify as verify_against_hf
        verify_against_hf(gm, model)
        if say:
            say("verified against the HF model: every layer's output and the logits agree")
    return gm
