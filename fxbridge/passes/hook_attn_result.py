"""Split the attention output projection per head so ``blocks.{i}.attn.hook_result`` [B,S,H,D] sees each head's
contribution ``z_h @ W_O[h]`` (without the bias), as TransformerLens's ``use_attn_result``.

    y = linear(flatten(z), W_O, b_O)       ->   r = per_head(flatten(z), W_O)      # [B,S,H,D], W_O viewed, not copied
                                                y = sum_heads(hook_result(r), b_O)
Only run when ``trace(..., use_attn_result=True)``: it costs B*S*H*D memory and a slower projection, exactly as in
TransformerLens. The per-head sum reorders the projection's additions (fp32 differences ~1e-7, not bit-identical).
"""
from __future__ import annotations

import torch
from einops import rearrange

from ..runtime.names import hook_name
from ..tracer.graph_facts import ModuleRegion, hf_target, scoped_meta
from .base import NoMatch, PassContext, graph_pass
from .graph_utils import NOTHING, hook_after, single

# Weight layouts of the output projection, as einops patterns to [heads, d_head, d_model].
_LINEAR = "d (h k) -> h k d"  # nn.Linear: weight [D, H*dh]
_CONV1D = "(h k) d -> h k d"  # transformers Conv1D (GPT-2 family): weight [H*dh, D]


def per_head_result(x: torch.Tensor, weight: torch.Tensor, n_heads: int, layout: str) -> torch.Tensor:
    """[.., H*dh] x W_O -> [.., H, D]: each head's output z_h @ W_O[h]."""
    w = rearrange(weight, layout, h=n_heads)
    return torch.einsum("...hk,hkd->...hd", x.unflatten(-1, (n_heads, w.shape[1])), w)


def sum_heads(result: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = result.sum(dim=-2)
    return out if bias is None else out + bias


def _erase_module(graph, nodes) -> None:
    for node in reversed(nodes):
        if not node.users:
            graph.erase_node(node)


@graph_pass(expects=lambda spec, dims: dims["n_layers"])
def hook_attn_result(ctx: PassContext) -> int:
    """Compute the attention output projection per head and hook the per-head results."""
    spec, graph = ctx.spec, ctx.graph
    found = 0
    for layer in range(ctx.dims["n_layers"]):
        path = spec.layer(layer, f"{spec.attn}.{spec.o_proj}")
        try:
            module = ctx.root.get_submodule(hf_target(path))
        except AttributeError:
            raise NoMatch(path, f"the attention output projection (spec o_proj={spec.o_proj!r})", "no such module") from None
        layout = _CONV1D if type(module).__name__ == "Conv1D" else _LINEAR
        region = ModuleRegion.of(graph, path)
        x = single(region.inputs, "input", path)
        out = region.output
        if out is None:
            raise NoMatch(path, "the output projection's output", NOTHING)
        meta = scoped_meta(out, spec.layer(layer, spec.attn))
        with graph.inserting_before(out):
            weight = graph.get_attr(hf_target(f"{path}.weight"))
            bias = graph.get_attr(hf_target(f"{path}.bias")) if getattr(module, "bias", None) is not None else None
            result = graph.call_function(per_head_result, (x, weight, ctx.dims["n_heads"], layout))
            summed = graph.call_function(sum_heads, (result, bias))
        for node in (weight, result, summed, *([bias] if bias is not None else [])):
            node.meta.update(meta)
            node.meta["fxbridge_pass"] = ctx.current_pass
        out.replace_all_uses_with(summed)
        _erase_module(graph, region.nodes)
        hook_after(ctx, result, hook_name("attn.hook_result", layer), scope=spec.layer(layer, spec.attn),
                   hf_module=path)
        found += 1
    return found
