"""Tiny configs for the attention-sinks group (architectures/sinks.py; merged into tiny.CONFIGS).

gpt_oss: learned per-head attention sinks, alternating sliding / full layers, q/k/v/o biases, YaRN rotary, and a
4-expert top-2 MoE whose experts are biased and apply a clamped SwiGLU.
"""
import torch

from tiny import COMMON, VOCAB, TinyConfig  # noqa: F401

# YaRN as the checkpoints (factor 32 on 4096 positions), scaled to the tiny context: factor 4 on 32 of 128
YARN = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False, "original_max_position_embeddings": 32}
GPT_OSS = dict(COMMON, vocab_size=128, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
               layer_types=["sliding_attention", "full_attention", "sliding_attention"], rope_parameters=YARN)

CONFIGS: dict[str, TinyConfig] = {
    "gpt_oss": TinyConfig("GptOssConfig", **GPT_OSS),  # transformers >= 5.0; rope_parameters default: YaRN
}


def _gpt_oss_weights(model) -> None:
    """Checkpoint-like magnitudes random init leaves out: sinks of order 1 (init std 0.02, where a sink barely
    changes the softmax) and expert gate/up projections large enough that the SwiGLU clamps (limit 7) really cut.
    The down projection is scaled down by as much, so the residual stays of order 1."""
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            sinks = layer.self_attn.sinks
            sinks.copy_(torch.linspace(-1.5, 2.0, sinks.numel()) + 0.3 * i)
            layer.mlp.experts.gate_up_proj.mul_(25.0)
            layer.mlp.experts.gate_up_proj_bias.normal_(0.0, 1.0)
            layer.mlp.experts.down_proj.mul_(0.1)
            layer.mlp.router.weight.mul_(20.0)  # routing that depends on the token


ADJUST = {"gpt_oss": _gpt_oss_weights}


def _gpt_oss_features(m) -> bool:
    layers, cfg = m.model.layers, m.config
    attn = layers[0].self_attn
    return (attn.sinks.shape == (cfg.num_attention_heads,) and float(attn.sinks.detach().abs().max()) > 1.0
            and attn.sliding_window == 4 and layers[1].self_attn.sliding_window is None
            and attn.q_proj.bias is not None and attn.o_proj.bias is not None
            and cfg.rope_parameters["rope_type"] == "yarn" and cfg.num_local_experts == 4
            and cfg.num_experts_per_tok == 2 and layers[0].mlp.experts.gate_up_proj_bias is not None
            and cfg.num_key_value_heads < cfg.num_attention_heads)


FEATURE_GUARDS: dict = {"gpt_oss": _gpt_oss_features}
# every layer's MLP is an MoE block (routing hooks instead of hook_pre/post); a sink logit per head
FAMILY: dict = {"gpt_oss": dict(rotary=True, gated=True, pos=False, extra=["attn.hook_sink_logits"],
                                moe_layers=(0, 1, 2))}
