"""The README's architecture table, generated from the registry (one row per family).

``python -m fxbridge.architectures.table README.md`` rewrites the table between the ``architectures:begin`` /
``architectures:end`` markers; ``tests/tools/test_docs.py`` fails when the README and the registry disagree.
"""
from __future__ import annotations

import sys
from pathlib import Path

BEGIN, END = "<!-- architectures:begin -->", "<!-- architectures:end -->"


_MOE_PASSES = ("hook_moe", "hook_scaled_input_moe", "hook_jetmoe")


def _layout(spec) -> str:
    """The layout facts a spec states, in words (configure()-chosen ones are the family's default config's)."""
    facts = ["RMSNorm" if spec.norm == "rms" else "LayerNorm", "RoPE" if spec.rotary else "no RoPE"]
    if spec.qkv:
        facts.append(f"fused `{spec.qkv}` ({spec.qkv_layout.replace('_', ' ')})")
    facts.append("parallel block" if spec.parallel else "sequential block")
    if spec.ln1_post or spec.ln2_post:
        facts.append("post-norms" if spec.ln1 is None else "sandwich norms")
    moe = [p.name for p in spec.passes if p.name in _MOE_PASSES]
    if moe:
        facts.append(f"MoE layers (`{moe[0]}`)")
    elif spec.mlp_gate:
        facts.append("gated MLP")
    if spec.pos_embed:
        facts.append("learned positions")
    if spec.configure is not None and not moe:  # MoE specs' configure picks the MoE layers
        facts.append("layout chosen per config")
    if spec.requires:
        facts.append(f"needs {', '.join(spec.requires)}")
    return ", ".join(facts)


def markdown_table() -> str:
    from . import _ALL
    rows = ["| HF `model_type` | family | layout | what is special, and where the hooks are |", "|---|---|---|---|"]
    for spec in _ALL:
        types = ", ".join(f"`{t}`" for t in spec.model_types)
        rows.append(f"| {types} | {spec.family} | {_layout(spec)} | {spec.notes} |")
    return "\n".join(rows)


def update(path: Path) -> bool:
    """Rewrite the table in ``path``; True when it changed."""
    text = path.read_text()
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} markers")
    new = f"{head}{BEGIN}\n{markdown_table()}\n{END}{tail}"
    path.write_text(new)
    return new != text


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["README.md"]:
        print(f"{arg}: {'updated' if update(Path(arg)) else 'already up to date'}")
