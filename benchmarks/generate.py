"""Decoding speed: ``gm.generate`` (KV cache, hooks live) against HF ``generate`` (its KV cache), interleaved.

    .venv/bin/python -m benchmarks.generate                    # CPU fp32: Llama 4 x 256, batch 4, prompt 32, 48 new
    .venv/bin/python -m benchmarks.generate --device cuda      # bf16, batch 8, prompt 512, 256 new tokens

Every workload generates the same number of tokens greedily (no EOS stop); the table gives the median seconds of
each and its ratio to HF, measured side by side in one run (round robin, so noise spreads over all of them):
- ``hf``: HF ``model.generate(do_sample=False)`` with its default (dynamic) KV cache;
- ``traced``: ``gm.generate(do_sample=False)``, nothing hooked;
- ``hook_resid``: the same with a no-op hook on ``blocks.{L/2}.hook_resid_post``;
- ``hook_every_resid``: a no-op hook on every ``hook_resid_post``;
- ``no_cache``: ``use_past_kv_cache=False`` (recomputes the whole sequence every step; for scale).
With ``--compile`` (issue 14's compiled decoding) also:
- ``hf_static_compiled``: HF ``generate(cache_implementation="static")`` with its own automatic compile of the
  forward (``CompileConfig``; on CPU in inductor's default mode with ``_compile_all_devices``, which HF needs to
  compile there);
- ``compiled``: ``gm.generate(compile=True)``: a static KV cache and the step compiled (inductor);
- ``compiled_hook_resid``: the same with the no-op hook on one ``hook_resid_post``.
Compilation happens in the warm-up calls and is not timed. The greedy tokens of every traced workload are checked
equal to HF's before anything is timed; the table gives tokens per second and ratios to HF's default and (with
``--compile``) to HF's compiled static cache.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import transformers

import fxbridge as bridge
from fxbridge.bench import time_round_robin

SIZES = {  # device type -> (dtype, batch, prompt, new tokens)
    "cpu": (torch.float32, 4, 32, 48),
    "cuda": (torch.bfloat16, 8, 512, 256),
}


def llama(dtype: torch.dtype, device: str) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                      eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _noop(tensor, hook):
    return None


def run(device: str, repeats: int, warmup: int, sizes=None, compile: bool = False) -> list[dict]:
    dtype, batch, prompt, new = sizes or SIZES[torch.device(device).type]
    model = llama(dtype, device)
    gm = bridge.trace(model)
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), device=device,
                        generator=torch.Generator(device).manual_seed(1))
    n_layers = model.config.num_hidden_layers
    one = [(f"blocks.{n_layers // 2}.hook_resid_post", _noop)]
    every = [(lambda name: name.endswith("hook_resid_post"), _noop)]

    def hf():
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    def traced(hooks=(), cache=True, compiled=False):
        def go():
            with gm.hooks(hooks):
                return gm.generate(ids, max_new_tokens=new, do_sample=False, stop_at_eos=False, verbose=False,
                                   use_past_kv_cache=cache, compile=compiled)
        return go

    fns = {"hf": hf, "traced": traced(), "hook_resid": traced(one), "hook_every_resid": traced(every),
           "no_cache": traced(cache=False)}
    if compile:
        from transformers import CompileConfig
        if torch.device(device).type == "cpu":  # HF compiles on CPU only when asked; CUDA graphs need a GPU
            config = CompileConfig(mode="default")
            config._compile_all_devices = True
        else:
            config = CompileConfig()

        def hf_static():
            with torch.no_grad():
                return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                      cache_implementation="static", compile_config=config)
        fns.update(hf_static_compiled=hf_static, compiled=traced(compiled=True),
                   compiled_hook_resid=traced(one, compiled=True))
    expected = hf()
    for name, fn in fns.items():
        if not torch.equal(fn(), expected):
            raise SystemExit(f"{name}'s greedy tokens differ from HF generate's; not timing")
    times = time_round_robin(fns, torch.device(device), warmup=warmup, repeats=repeats)
    compiled_hf = times.get("hf_static_compiled")
    return [{"workload": name, "seconds": t, "tokens_per_s": batch * new / t, "ratio_to_hf": t / times["hf"],
             "ratio_to_hf_compiled": None if compiled_hf is None else t / compiled_hf, "device": device,
             "dtype": str(dtype), "batch": batch, "prompt": prompt, "new_tokens": new} for name, t in times.items()]


def format_rows(rows: list[dict]) -> str:
    head = rows[0]
    lines = [f"Llama 4 x 256, {head['dtype']}, {head['device']}, batch {head['batch']}, prompt {head['prompt']}, "
             f"{head['new_tokens']} new tokens (median of interleaved repeats)",
             f"{'workload':<20} {'seconds':>9} {'tokens/s':>9} {'x HF':>6} {'x HF compiled':>14}"]
    for r in rows:
        vs_compiled = "" if r["ratio_to_hf_compiled"] is None else f"{r['ratio_to_hf_compiled']:.2f}"
        lines.append(f"{r['workload']:<20} {r['seconds']:>9.4f} {r['tokens_per_s']:>9.0f} {r['ratio_to_hf']:>6.2f} "
                     f"{vs_compiled:>14}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time compiled decoding (ours and HF's)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = run(args.device, args.repeats, args.warmup, compile=args.compile)
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "transformers": transformers.__version__, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
