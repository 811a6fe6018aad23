"""globe_kernels: the ops GloBE's trainer and inference patch run on (see ``globe_kernels.ops``)."""

from . import ops
from .ops import (
    SparseCodes,
    adapter_gemm,
    backend_counts,
    cholesky_solve_batched,
    compose,
    group_by_expert,
    prune_renorm,
    to_dense_codes,
    to_sparse_codes,
    use_backend,
)

__all__ = [
    "ops",
    "SparseCodes",
    "adapter_gemm",
    "backend_counts",
    "cholesky_solve_batched",
    "compose",
    "group_by_expert",
    "prune_renorm",
    "to_dense_codes",
    "to_sparse_codes",
    "use_backend",
]
