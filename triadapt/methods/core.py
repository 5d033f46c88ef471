"""The shared core of the native low-rank methods, one import path for all its parts:

* :mod:`triadapt.methods.adapted_linear` — :class:`AdaptedLinear` (y = W0 x + b + s · B · core · A ·
  dropout(x), factors stored as one block per growth event) and :func:`optimizer_group`;
* :mod:`triadapt.methods.cores` — :class:`IdentityCore`, :class:`DiagonalCore`, :class:`TriangularCore`;
* :mod:`triadapt.methods.lowrank_kernels` — the autograd kernels (factored and folded) and :func:`fold_pays`;
* :mod:`triadapt.methods.module_discovery` — :func:`find_target_linears`, :func:`replace_module`,
  :func:`adapted_layers`, :func:`module_matches`;
* :mod:`triadapt.methods.orthogonal_regulariser` — :func:`orthogonal_regulariser`;
* :mod:`triadapt.methods.fp32_statistics` — :func:`fp32_statistics`, :func:`at_least_fp32`.
"""

from triadapt.methods.adapted_linear import AdaptedLinear, optimizer_group
from triadapt.methods.cores import DiagonalCore, IdentityCore, TriangularCore
from triadapt.methods.fp32_statistics import at_least_fp32, fp32_statistics
from triadapt.methods.lowrank_kernels import FOLD_BLOCK_ROWS, fold_pays
from triadapt.methods.module_discovery import (
    adapted_layers,
    find_target_linears,
    layer_index,
    matrix_type,
    module_matches,
    replace_module,
)
from triadapt.methods.orthogonal_regulariser import orthogonal_regulariser

__all__ = [
    "FOLD_BLOCK_ROWS",
    "AdaptedLinear",
    "DiagonalCore",
    "IdentityCore",
    "TriangularCore",
    "adapted_layers",
    "at_least_fp32",
    "find_target_linears",
    "fold_pays",
    "fp32_statistics",
    "layer_index",
    "matrix_type",
    "module_matches",
    "optimizer_group",
    "orthogonal_regulariser",
    "replace_module",
]
