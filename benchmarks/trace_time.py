"""Trace time against depth, per family, on the meta device.

``.venv/bin/python -m benchmarks.trace_time [--layers 2 32] [--families ...] [--json out]``

For every family in the registry (``fxbridge.architectures.supported_architectures()``, so families added later
are picked up without touching this file), a small config is built from the family's own config class
(``transformers.CONFIG_MAPPING[model_type]``) with the widths of ``SMALL`` (those the class has), at each depth of
``--layers``; the model is built on the meta device (no weights materialised) and traced. The table gives, per
family / config / depth, the wall seconds of ``fxbridge.trace``, the process CPU seconds (steadier than the wall
clock on a shared machine) and whether the capture was stitched (``gm.report.capture_notes``).

Where a family's defaults do not suit (huge per-family widths) or where one family has several layouts worth
timing, ``CONFIGS`` below lists config overrides per model type, one entry per named config; a value may be a
function of the depth. Per-layer lists of the default config (``layer_types``) are rebuilt by the config class
for the new depth where it does that, else repeated to the new length. A family that fails to build or trace
prints a one-line reason and the run goes on. One warm-up trace runs first (torch.export's first call in a
process imports and initialises a lot); results go to stdout and, with ``--json``, to a file: do not commit them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

# Widths small enough that building and tracing cost only what the graph costs; set where the config has the name.
SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16)

DEFAULT = object()  # an override that keeps the config class's default (drops the SMALL entry)

_MLA = dict(num_key_value_heads=4, head_dim=8, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
            moe_intermediate_size=32, first_k_dense_replace=1)

# model_type -> {config name: overrides}. A family absent here runs once, as "<model_type>", with SMALL only.
CONFIGS: dict[str, dict[str, dict]] = {
    # GPTBigCode's key/value heads follow multi_query (one, or all), not num_key_value_heads
    "gpt_bigcode": {"gpt_bigcode": dict(multi_query=True, num_key_value_heads=DEFAULT),
                    "gpt_bigcode-mha": dict(multi_query=False, num_key_value_heads=SMALL["num_attention_heads"])},
    "falcon": {
        "falcon-7b": dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True, alibi=False,
                          bias=False),
        "falcon-rw": dict(new_decoder_architecture=False, multi_query=False, parallel_attn=False, alibi=True,
                          bias=True),
        "falcon-40b": dict(new_decoder_architecture=True, num_attention_heads=8, num_kv_heads=2),
    },
    # rotary_dim defaults (64) exceed the small head dim
    "codegen": {"codegen": dict(rotary_dim=8)},
    "gptj": {"gptj": dict(rotary_dim=8)},
    # DeepSeek: small latents and experts (the defaults are full size: 256 experts, LoRA ranks 512 / 1536); one
    # dense layer then MoE layers (two layer kinds), and the V2-Lite layout without a query LoRA
    "deepseek_v3": {"deepseek_v3": dict(_MLA)},
    "deepseek_v2": {"deepseek_v2": dict(_MLA), "deepseek_v2-lite": dict(_MLA, q_lora_rank=None)},
    "gemma4_text": {
        # transformers' defaults: 5 sliding : 1 full, per-layer embeddings
        "gemma4_text": dict(global_head_dim=32, vocab_size_per_layer_input=512, hidden_size_per_layer_input=8),
        # without per-layer embeddings (their width grows with depth, which keeps the capture from stitching)
        "gemma4_text-no-ple": dict(global_head_dim=32, hidden_size_per_layer_input=0),
        # the tests' Gemma 4: k = v full layers, a KV-shared tail, MoE block
        "gemma4_text-kv-shared-moe": dict(
            global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True, use_double_wide_mlp=True,
            num_kv_shared_layers=lambda n: n // 4, vocab_size_per_layer_input=512, hidden_size_per_layer_input=8,
            enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=24),
    },
    # DbrxAttention reads attn_config.rope_theta, which DbrxAttentionConfig does not define
    "dbrx": {"dbrx": dict(d_model=64, n_heads=4, attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                          ffn_config=dict(moe_num_experts=4, moe_top_k=2, ffn_hidden_size=128))},
    "llama4_text": {
        # transformers' defaults: every layer MoE (16 experts, top-1), every 4th layer NoPE
        "llama4_text": dict(num_local_experts=4, intermediate_size_mlp=128),
        # the tests' Llama 4: dense / MoE interleaved (step 2), top-2
        "llama4_text-interleaved": dict(num_local_experts=4, num_experts_per_tok=2, interleave_moe_layer_step=2,
                                        intermediate_size_mlp=128),
    },
}


def build_config(model_type: str, n_layers: int, overrides: dict | None = None):
    """A small config of ``model_type`` with ``n_layers`` decoder layers (see the module docstring)."""
    from transformers import CONFIG_MAPPING
    cls = CONFIG_MAPPING[model_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = cls()
    old = default.num_hidden_layers
    names = set(vars(default)) | set(getattr(cls, "attribute_map", {}))
    kwargs = {k: v for k, v in SMALL.items() if k in names}
    kwargs["num_hidden_layers"] = n_layers
    for k, v in vars(default).items():  # per-layer lists: let the class rebuild them for the new depth
        if isinstance(v, list) and len(v) == old and not k.startswith("_"):
            kwargs[k] = None
    for k, v in (overrides or {}).items():
        if v is DEFAULT:
            kwargs.pop(k, None)
        else:
            kwargs[k] = v(n_layers) if callable(v) else v
    try:
        config = cls(**kwargs)
    except Exception:  # the class wants its lists: repeat the default's to the new length
        for k, v in vars(default).items():
            if isinstance(v, list) and len(v) == old and kwargs.get(k, 0) is None:
                kwargs[k] = (v * n_layers)[:n_layers]
        config = cls(**kwargs)
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):  # defaults beyond the small vocabulary (GLM, Phi-3)
        v = getattr(config, k, None)
        if isinstance(v, int) and v >= config.vocab_size:
            setattr(config, k, 0)
    return config


def build_model(config):
    import torch
    import transformers as tf
    with torch.device("meta"):
        return tf.AutoModelForCausalLM.from_config(config)


def time_trace(config) -> dict:
    import fxbridge
    model = build_model(config)
    wall, cpu = time.perf_counter(), time.process_time()
    gm = fxbridge.trace(model)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    notes = list(gm.report.capture_notes)
    return {"seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
            "capture_seconds": round(gm.report.capture_seconds, 3),
            "stitched": any(n.startswith("stitched") for n in notes), "notes": notes, "n_hooks": len(gm.hook_dict)}


def entries(families: list[str] | None) -> list[tuple[str, str, dict]]:
    from fxbridge.architectures import supported_architectures
    out = []
    for model_type in supported_architectures():
        named = CONFIGS.get(model_type, {model_type: {}})
        for name, overrides in named.items():
            if families and model_type not in families and name not in families:
                continue
            out.append((model_type, name, overrides))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], usage=None)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--families", nargs="+", help="model types or config names (default: every family)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    import logging
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    try:
        import transformers
        transformers.logging.set_verbosity_error()
    except Exception:
        pass
    import fxbridge
    try:  # warm-up: the first torch.export in a process pays for imports and initialisation
        fxbridge.trace(build_model(build_config("llama", 1)))
    except Exception as exc:
        print(f"warm-up failed: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
    results = []
    header = f"{'config':<28} {'layers':>6} {'wall s':>8} {'cpu s':>8} {'capture s':>9}  capture"
    print(header)
    print("-" * len(header), flush=True)
    for model_type, name, overrides in entries(args.families):
        for n in args.layers:
            row = {"model_type": model_type, "config": name, "layers": n}
            try:
                row.update(time_trace(build_config(model_type, n, overrides)))
                how = row["notes"][0] if row["notes"] else ""
                print(f"{name:<28} {n:>6} {row['seconds']:>8.2f} {row['cpu_seconds']:>8.2f} "
                      f"{row['capture_seconds']:>9.2f}  {how}", flush=True)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                print(f"{name:<28} {n:>6} {'failed':>8}  {row['error']}", flush=True)
            results.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
