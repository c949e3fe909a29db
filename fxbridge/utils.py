"""TransformerLens's ``utils`` functions that notebooks call with a model: ``from fxbridge import utils``.

- ``get_act_name("pattern", 3)`` -> ``"blocks.3.attn.hook_pattern"`` (TL's shorthand);
- ``lm_cross_entropy_loss(logits, tokens, attention_mask=None, per_token=False)`` (TL's next-token loss; what
  ``gm(..., return_type="loss")`` computes);
- ``to_numpy`` (TL's helper);
- ``sample_logits(final_logits, top_k=None, top_p=None, temperature=1.0, freq_penalty=0.0, tokens=None)``: TL's
  sampling step (what ``gm.generate`` calls);
- ``test_prompt(prompt, answer, model, prepend_space_to_answer=True, print_details=True, prepend_bos=None,
  top_k=10)``: TL's printed report of the answer's rank, logit and probability (``runtime/prompts.py``).
"""
from __future__ import annotations

import numpy as np
import torch

from .runtime.forward import lm_cross_entropy_loss
from .runtime.generate import sample_logits
from .runtime.names import get_act_name
from .runtime.prompts import test_prompt


def to_numpy(tensor) -> np.ndarray:
    """A tensor (detached, on the CPU), a list / tuple of numbers or a number as a numpy array, as TL's."""
    if isinstance(tensor, np.ndarray):
        return tensor
    if isinstance(tensor, (list, tuple)):
        return np.array(tensor)
    if isinstance(tensor, torch.Tensor):
        return tensor.detach().cpu().numpy()
    if isinstance(tensor, (int, float, bool, str)):
        return np.array(tensor)
    raise ValueError(f"to_numpy takes a tensor, array, list, tuple or number, got {type(tensor).__name__}")


__all__ = ["get_act_name", "lm_cross_entropy_loss", "sample_logits", "test_prompt", "to_numpy"]
