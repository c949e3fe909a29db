"""Llama-style decoders: separate q/k/v projections, RMSNorm, rotary, gated SiLU MLP.

Mistral adds a sliding window (carried by HF's mask), Qwen2 biases on q/k/v, Qwen3 q/k RMSNorms
(``hook_q``/``hook_k`` are before them, ``hook_rot_q``/``hook_rot_k`` after norm and rotary).
"""
from .spec import ArchSpec

LLAMA = ArchSpec(model_types=("llama",), family="Llama")
MISTRAL = ArchSpec(model_types=("mistral",), family="Mistral", notes="sliding-window attention (in the mask)")
QWEN2 = ArchSpec(model_types=("qwen2",), family="Qwen2", notes="q/k/v biases (inside hook_q/k/v)")
QWEN3 = ArchSpec(model_types=("qwen3",), family="Qwen3", notes="q/k RMSNorm between hook_q/k and hook_rot_q/k")

SPECS = (LLAMA, MISTRAL, QWEN2, QWEN3)
