"""Pallas grouped matmul (forward `gmm`, transposed `tgmm`) for TPU and GPU.

`ops.gmm` / `ops.tgmm` are the entry points (differentiable, backend chosen
from the platform); `common` holds the group metadata both kernels share,
`tpu` the Mosaic kernels and `gpu` the Triton kernels.
"""
from hashmoe.kernels.common import GroupMetadata
from hashmoe.kernels.common import make_group_metadata
from hashmoe.kernels.ops import gmm
from hashmoe.kernels.ops import resolve_backend
from hashmoe.kernels.ops import tgmm

__all__ = ["GroupMetadata", "gmm", "make_group_metadata", "resolve_backend",
           "tgmm"]
