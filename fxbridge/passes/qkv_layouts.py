"""Fused QKV layouts as data: how q, k, v sit in the output of one fused projection.

With G = Hkv groups and R = H / Hkv query heads per group (einops notation):
    "contiguous": b s ((H + 2 G) d) -> b s (H + 2 G) d;  q, k, v = heads [0:H], [H:H+G], [H+G:H+2G]
                  (GPT-2 c_attn, GPTBigCode MQA [D, dh, dh], Falcon-7B multi_query)
    "per_head":   b s (H 3 d)       -> b s H 3 d;        q, k, v = [..., 0, :], [..., 1, :], [..., 2, :]
                  (GPTBigCode MHA, Falcon old MHA / RW)
    "per_group":  b s (G (R+2) d)   -> b s G (R+2) d;    q = rearrange([..., :R, :], "b s g r d -> b s (g r) d"),
                  k, v = [..., R, :], [..., R+1, :]       (Falcon new_decoder_architecture, 40B / 180B)
    "blocks:M:ORDER": b s (M 3 r d) -> b s M 3 r d, r = H / M, the roles in ORDER (a permutation of "qkv") along
                  the 3; role = rearrange([..., ORDER.index(role), :, :], "b s m r d -> b s (m r) d") (MHA only;
                  CodeGen "blocks:4:qvk": HF's mp_num = 4 model-parallel blocks, each [q | v | k])
Each layout is one unflatten of the last dim plus per-role slice/select ops, all views except q's flatten in
"per_group". ``passes/split_fused_qkv.py`` inserts exactly these ops into the graph; ``split_eager`` runs them.
"""
from __future__ import annotations

import torch

aten = torch.ops.aten
LAYOUTS = ("contiguous", "per_head", "per_group", "blocks:M:ORDER")


def _blocks(layout: str, n_heads: int, n_kv: int, d_head: int) -> tuple[list, dict[str, list]]:
    """``"blocks:M:ORDER"``: M blocks, each holding H/M heads of every role, the roles in ORDER."""
    try:
        _, m, order = layout.split(":")
        m = int(m)
    except ValueError:
        raise ValueError(f"qkv_layout {layout!r}: expected 'blocks:<number of blocks>:<order of q, k, v>'") from None
    if sorted(order) != ["k", "q", "v"] or m < 1 or n_heads % m or n_kv != n_heads:
        raise ValueError(f"qkv_layout {layout!r} needs ORDER a permutation of 'qkv', H divisible by M and as many KV "
                         f"heads as query heads, got H={n_heads}, Hkv={n_kv}")
    grid = [m, 3, n_heads // m, d_head]
    parts = {role: [(aten.select.int, (3, order.index(role))), (aten.flatten.using_ints, (2, 3))] for role in "qkv"}
    return grid, parts


def layout_steps(layout: str, n_heads: int, n_kv: int, d_head: int) -> tuple[tuple, dict[str, list]]:
    """The layout as ops: (unflatten args, {role: [(op, args)...]}) taking [B,S,N] to q/k/v [B,S,h,dh]."""
    if layout == "contiguous":
        grid = [n_heads + 2 * n_kv, d_head]
        parts = {"q": [(aten.slice.Tensor, (2, 0, n_heads))],
                 "k": [(aten.slice.Tensor, (2, n_heads, n_heads + n_kv))],
                 "v": [(aten.slice.Tensor, (2, n_heads + n_kv, n_heads + 2 * n_kv))]}
    elif layout == "per_head":
        if n_kv != n_heads:
            raise ValueError(f"qkv_layout 'per_head' needs as many KV heads as query heads, got H={n_heads}, "
                             f"Hkv={n_kv}")
        grid = [n_heads, 3, d_head]
        parts = {role: [(aten.select.int, (3, i))] for i, role in enumerate("qkv")}
    elif layout == "per_group":
        if n_heads % n_kv:
            raise ValueError(f"qkv_layout 'per_group' needs H divisible by Hkv, got H={n_heads}, Hkv={n_kv}")
        rep = n_heads // n_kv
        grid = [n_kv, rep + 2, d_head]
        parts = {"q": [(aten.slice.Tensor, (3, 0, rep)), (aten.flatten.using_ints, (2, 3))],
                 "k": [(aten.select.int, (3, rep))], "v": [(aten.select.int, (3, rep + 1))]}
    elif layout.startswith("blocks:"):
        grid, parts = _blocks(layout, n_heads, n_kv, d_head)
    else:
        raise ValueError(f"unknown qkv_layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return (-1, grid), parts


def split_eager(fused: torch.Tensor, layout: str, n_heads: int, n_kv: int, d_head: int) -> dict[str, torch.Tensor]:
    """q, k, v of ``fused`` [B,S,N] per the layout, computed eagerly (the probe and the tests use this)."""
    unflat, parts = layout_steps(layout, n_heads, n_kv, d_head)
    grid = aten.unflatten.int(fused, *unflat)
    out = {}
    for role, steps in parts.items():
        x = grid
        for op, args in steps:
            x = op(x, *args)
        out[role] = x
    return out
