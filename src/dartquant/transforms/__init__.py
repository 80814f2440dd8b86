"""Exact, function-preserving transforms: norm fusion, rotations (R1-R4), online modules.

All offline folding is done in float64, one tensor at a time, then cast back to the
parameter's dtype: exact to ~1e-15 in float64 models, lean in memory for big ones.
"""

from .fuse import exact_norms_, fuse_norms_, split_experts_, untie_embeddings_
from .online import install_online_, online_spec
from .rotation import RotationSet, rotate_

__all__ = ["exact_norms_", "fuse_norms_", "split_experts_", "untie_embeddings_", "RotationSet", "rotate_", "install_online_", "online_spec"]
