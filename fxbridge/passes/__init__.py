"""Graph -> graph rewrites, one pass a file. A spec lists the pass objects (configured where a pass takes
parameters, ``remove_eval_dropout(per_layer=2)``); ``PASSES`` maps each pass's name to its unconfigured object."""
from .alias_shared_kv import alias_shared_kv
from .base import GraphPass, NoMatch, PassContext, PassResult, check_order, run_passes
from .capture_eager_attention import capture_eager_attention
from .hook_attention import hook_attention
from .hook_attn_result import hook_attn_result
from .hook_diff_attention import hook_diff_attention
from .hook_embeddings import hook_embeddings
from .hook_jetmoe import hook_jetmoe
from .hook_final_softcap import hook_final_softcap
from .hook_logit_scale import hook_logit_scale
from .hook_mla import hook_mla
from .hook_mlp import hook_mlp
from .hook_moe import hook_moe
from .hook_norms import hook_norms
from .hook_per_layer_embeddings import hook_per_layer_embeddings
from .hook_qkv import hook_qkv
from .hook_residual import hook_residual
from .hook_scaled_input_moe import hook_scaled_input_moe
from .hook_shared_qkv import hook_shared_qkv
from .hook_unembed import hook_unembed
from .make_adds_out_of_place import make_adds_out_of_place
from .remove_eval_dropout import remove_eval_dropout
from .route_shared_kv import route_shared_kv
from .split_fused_qkv import split_fused_qkv
from .unflatten_token_rows import unflatten_token_rows

PASSES: dict[str, GraphPass] = {p.name: p for p in (
    hook_embeddings, hook_attention, hook_qkv, hook_mlp, hook_norms, hook_residual, hook_unembed,
    hook_final_softcap, hook_logit_scale,
    hook_attn_result,
    alias_shared_kv, route_shared_kv, hook_shared_qkv, hook_per_layer_embeddings, hook_moe,
    hook_mla, hook_scaled_input_moe,
    split_fused_qkv, capture_eager_attention, remove_eval_dropout, make_adds_out_of_place,
    unflatten_token_rows,
    hook_diff_attention, hook_jetmoe,
)}

__all__ = ["PASSES", "GraphPass", "NoMatch", "PassContext", "PassResult", "check_order", "run_passes", *PASSES]
