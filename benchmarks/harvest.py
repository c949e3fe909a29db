"""Activation harvesting (the workload behind SAE training): one mid-depth layer's ``hook_resid_post`` over many
batches, against HF's full forward with ``output_hidden_states``, measured interleaved in one run.

    .venv/bin/python -m benchmarks.harvest                     # CPU fp32: Llama 8 x 256, batch 4 x 128, layer 3
    .venv/bin/python -m benchmarks.harvest --device cuda       # bf16, batch 8 x 512

Workloads (seconds per batch, ratio to ``hf_hidden_states``):
- ``hf_hidden_states``: ``model(ids, output_hidden_states=True).hidden_states[L + 1]``, HF eager;
- ``hf_compiled``: the same through ``torch.compile(model)``;
- ``cache_full``: ``gm.run_with_cache(ids, names_filter=name)`` (the whole forward runs);
- ``cache_stop``: ``gm.run_with_cache(ids, names_filter=name, stop_at_layer=L + 1)`` (nothing after layer L runs);
- ``cache_stop_compiled``: the same on a ``gm.compile()``-d copy.
Every workload's activation is checked against HF's hidden state before anything is timed.
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch
import transformers

import fxbridge as bridge
from fxbridge.bench import time_round_robin

SIZES = {"cpu": (torch.float32, 4, 128), "cuda": (torch.bfloat16, 8, 512)}
LAYERS, LAYER = 8, 3


def run(device: str, repeats: int, warmup: int, sizes=None, compile: bool = True) -> list[dict]:
    dtype, batch, seq = sizes or SIZES[torch.device(device).type]
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=2048)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()
    gm = bridge.trace(model)
    name = f"blocks.{LAYER}.hook_resid_post"
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device,
                        generator=torch.Generator(device).manual_seed(1))

    def hf():
        return model(ids, output_hidden_states=True).hidden_states[LAYER + 1]

    def cache(module, stop):
        def go():
            kwargs = {"stop_at_layer": LAYER + 1} if stop else {}
            return module.run_with_cache(ids, names_filter=name, **kwargs)[1][name]
        return go

    fns = {"hf_hidden_states": hf, "cache_full": cache(gm, False), "cache_stop": cache(gm, True)}
    if compile:
        compiled_hf = torch.compile(model)
        compiled = copy.deepcopy(gm)
        compiled.compile()
        fns["hf_compiled"] = lambda: compiled_hf(ids, output_hidden_states=True).hidden_states[LAYER + 1]
        fns["cache_stop_compiled"] = cache(compiled, True)
    with torch.no_grad():
        expected = hf()
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        for label, fn in fns.items():
            if (fn() - expected).abs().max() > tolerance:
                raise SystemExit(f"{label}'s activation differs from HF's hidden state; not timing")
        times = time_round_robin(fns, torch.device(device), warmup=warmup, repeats=repeats)
    base = times["hf_hidden_states"]
    return [{"workload": k, "seconds": t, "ratio_to_hf": t / base, "device": device, "dtype": str(dtype),
             "batch": batch, "seq": seq, "layer": LAYER, "layers": LAYERS} for k, t in times.items()]


def format_rows(rows: list[dict]) -> str:
    head = rows[0]
    lines = [f"Llama {head['layers']} x 256, {head['dtype']}, {head['device']}, batch {head['batch']} x {head['seq']}, "
             f"blocks.{head['layer']}.hook_resid_post (median of interleaved repeats)",
             f"{'workload':<22} {'seconds':>9} {'x HF':>6}"]
    lines += [f"{r['workload']:<22} {r['seconds']:>9.4f} {r['ratio_to_hf']:>6.2f}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled workloads")
    args = parser.parse_args(argv)
    print(format_rows(run(args.device, args.repeats, args.warmup, compile=not args.no_compile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
