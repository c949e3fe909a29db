"""The hook table: one row per hook point (name, symbolic shape, dtype, HF module, pass that made it)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class HookRow:
    name: str
    shape: str
    dtype: str
    hf_module: str
    made_by: str

    def as_dict(self) -> dict:
        return asdict(self)


class HookTable(list):
    """A list of HookRow that prints as an aligned text table."""

    def __str__(self) -> str:
        headers = ("hook", "shape", "dtype", "HF module", "pass")
        rows = [(r.name, r.shape, r.dtype, r.hf_module, r.made_by) for r in self]
        widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in rows]
        return "\n".join(lines)


def hook_table(gm) -> HookTable:
    dtype = _param_dtype(gm)
    return HookTable(
        HookRow(name, "[" + ",".join(hp.shape) + "]", dtype, hp.hf_module, hp.made_by)
        for name, hp in gm.hook_dict.items()
    )


def _param_dtype(gm) -> str:
    for p in gm.parameters():
        return str(p.dtype).replace("torch.", "")
    return "?"
