"""``make demo`` / ``python -m fxbridge demo``: trace the embedded default model and look inside it.

The default is a small Llama built from ``fxbridge/configs/demo_llama.json`` with random weights (fixed seed):
no hub is needed. Pass ``--config`` to use another ``config.json``.
"""
from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import torch

from .loading import build_from_config  # noqa: F401  (moved to loading.py; kept importable here)


def default_config_path() -> Path:
    return Path(str(resources.files("fxbridge") / "configs" / "demo_llama.json"))


def run_demo(config_path: str | None = None, layer: int = 1, head: int = 3) -> None:
    import fxbridge as bridge

    path = Path(config_path) if config_path else default_config_path()
    print(f"fxbridge demo: building a random-weight model from {path}")
    model = build_from_config(path)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"  {type(model).__name__}: {n_params / 1e6:.2f}M parameters, model_type={model.config.model_type!r}\n")

    gm = bridge.trace(model, progress=True)
    print(f"\n{gm.report}\n")
    print("Hook table")
    print(gm.hook_table())

    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_logits = model(tokens).logits
        start = time.perf_counter()
        logits, cache = gm.run_with_cache(tokens)
        cache_ms = (time.perf_counter() - start) * 1000
    print(f"\nrun_with_cache: {len(cache)} activations in {cache_ms:.1f} ms; "
          f"max |traced - HF| = {(logits - hf_logits).abs().max().item():.2e}")
    for key in (("resid_post", layer), ("pattern", layer), ("z", layer), ("scale", layer, "ln1")):
        print(f"  cache{key!s:<28} -> {tuple(cache[key].shape)}")

    layer = min(layer, gm.dims["n_layers"] - 1)
    head = min(head, gm.dims["n_heads"] - 1)

    def ablate(z, hook):
        z[:, :, head] = 0.0

    targets = tokens[:, 1:]

    def loss(lg):
        return torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), targets.reshape(-1)).item()

    with torch.no_grad():
        ablated = gm.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate)])
    print(f"\nablating head {layer}.{head} through blocks.{layer}.attn.hook_z:")
    print(f"  loss {loss(logits):.4f} -> {loss(ablated):.4f}; "
          f"max logit change {(ablated - logits).abs().max().item():.3e}")
    print(f"  (random weights: the effect is real but small; on a trained model this is a head-ablation study)")
