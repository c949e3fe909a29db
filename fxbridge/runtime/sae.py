"""Sparse-autoencoder splicing in HookedSAETransformer's API, duck-typed on SAELens's ``SAE`` objects.

(Scaffold: filled in by the SAE work of issue 12.)
"""
from __future__ import annotations


class SAEMixin:
    """``add_sae`` / ``run_with_saes`` / ... on a traced module, built on its hook points."""
