"""Weights in TransformerLens layouts (``W_Q`` [L,H,D,dh] ...), views of the HF weights; ``gm.blocks[i]`` views.

(Scaffold: filled in by the weights work of issue 12.)
"""
from __future__ import annotations


class WeightsMixin:
    """TransformerLens's weight properties on a traced module."""
