"""Permutation specs: trace a model and derive which parameter axes share one permutation of hidden units."""
from .permspec import PermSpec, permutation_spec, permute

__all__ = ["PermSpec", "permutation_spec", "permute"]
