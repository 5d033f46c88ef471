"""Reference for the sameness tests only: TriAdaptLoRA's storage before one block per growth event.

Every rank of the "single" parametrisation was four Parameters — a row of A, a column of B, a
row of L and a column of U — and a ``block_c0`` block was a dense ``rows`` and ``cols`` pair.
The classes below are that code, kept verbatim apart from their names, so that
tests/test_block_layout.py can run both layouts side by side from one seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from triadapt.methods.cores import DiagonalCore, _append, _values
from triadapt.methods.triadapt import TriAdaptLoRA


class _FlatCat(torch.autograd.Function):
    """Flatten and concatenate tensors in one autograd node (not one view node per tensor)."""

    @staticmethod
    def forward(ctx, *parts):
        ctx.shapes = [p.shape for p in parts]
        return torch.cat([p.reshape(-1) for p in parts])

    @staticmethod
    def backward(ctx, grad):
        sizes = [math.prod(s) for s in ctx.shapes]
        return tuple(g.view(s) for g, s in zip(grad.split(sizes), ctx.shapes))


class LegacyTriangularCore(nn.Module):
    """core = C = L + U, grown by blocks.

    A block covering ranks [r0, r1) adds ``rows`` of shape (r1−r0) × r1 — rows r0..r1−1 of L,
    columns 0..r1−1 — and ``cols`` of shape r1 × (r1−r0) — columns r0..r1−1 of U, rows
    0..r1−1. With blocks of size 1 (the "single" variant) row i of L holds i+1 entries and
    column j of U holds j+1 entries: L is lower-, U upper-triangular and the diagonal is
    parametrised twice, as in the author's code. Inside a larger block both parts are dense.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rows = nn.ParameterList()
        self.cols = nn.ParameterList()
        self._index: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._flat: torch.Tensor | None = None

    @property
    def n_components(self) -> int:
        return len(self.rows)

    @property
    def rank(self) -> int:
        n = len(self.rows)
        return self.rows._parameters[str(n - 1)].shape[1] if n else 0

    def param_list(self) -> list[nn.Parameter]:
        return _values(self.rows) + _values(self.cols)

    def append(self, rows: torch.Tensor, cols: torch.Tensor) -> list[nn.Parameter]:
        r1 = rows.shape[1]
        k = rows.shape[0]
        if cols.shape != (r1, k) or r1 != self.rank + k:
            raise ValueError(f"block shapes {tuple(rows.shape)} / {tuple(cols.shape)} do not extend rank {self.rank}")
        new = [nn.Parameter(rows), nn.Parameter(cols)]
        _append(self.rows, new[0])
        _append(self.cols, new[1])
        self._index = self._flat = None
        return new

    def _scatter_index(self, device: torch.device):
        # Flat positions of every stored value in the r×r matrix, in concatenation order;
        # rebuilt only when the structure grows.
        if self._index is None or self._index[0].device != device:
            lr, lc, ur, uc = [], [], [], []
            r0 = 0
            for rows in self.rows:
                k, r1 = rows.shape
                rr, cc = torch.meshgrid(torch.arange(r0, r1), torch.arange(r1), indexing="ij")
                lr.append(rr.reshape(-1))
                lc.append(cc.reshape(-1))
                rr, cc = torch.meshgrid(torch.arange(r1), torch.arange(r0, r1), indexing="ij")
                ur.append(rr.reshape(-1))
                uc.append(cc.reshape(-1))
                r0 = r1
            self._index = tuple(torch.cat(x).to(device) for x in (lr, lc, ur, uc))
        return self._index

    def lower(self) -> torch.Tensor:
        r = self.rank
        lr, lc, _, _ = self._scatter_index(self.rows[0].device)
        flat = torch.cat([p.reshape(-1) for p in self.rows])
        return flat.new_zeros(r, r).index_put((lr, lc), flat)

    def upper(self) -> torch.Tensor:
        r = self.rank
        _, _, ur, uc = self._scatter_index(self.cols[0].device)
        # cols[b] is r1 × k, flattened row-major like the (row, col) pairs of its index.
        flat = torch.cat([p.reshape(-1) for p in self.cols])
        return flat.new_zeros(r, r).index_put((ur, uc), flat)

    def _flat_positions(self, device: torch.device) -> torch.Tensor:
        # Position of every stored value (rows, then cols) in the flattened pair [L, U] (2·r·r).
        if self._flat is None or self._flat.device != device:
            r = self.rank
            lr, lc, ur, uc = self._scatter_index(device)
            self._flat = torch.cat([lr * r + lc, r * r + ur * r + uc])
        return self._flat

    def matrix(self, rank: int | None = None) -> torch.Tensor:
        """C = L + U from one flat concatenation and one scatter (a fixed number of autograd nodes,
        whatever the number of blocks)."""
        r = self.rank
        flat = _FlatCat.apply(*self.param_list())
        pos = self._flat_positions(flat.device)
        return flat.new_zeros(2 * r * r).index_put((pos,), flat).view(2, r, r).sum(0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.matrix())

    def operand(self) -> tuple[str, torch.Tensor]:
        return "matrix", self.matrix()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.rows) + sum(p.numel() for p in self.cols)


class LegacyTriAdaptLoRA(TriAdaptLoRA):
    """TriAdaptLoRA with the per-component storage (the former ``_append``, verbatim)."""

    def _new_core(self) -> nn.Module:
        return LegacyTriangularCore() if self.core == "triangular" else DiagonalCore()

    def _append(self, layer, k: int, initial: bool) -> list[nn.Parameter]:
        device = layer.base.weight.device
        d_in, d_out, r1 = layer.in_features, layer.out_features, layer.rank
        zero_core = self.init == "block_c0"
        triangular = self.core == "triangular"
        new: list[nn.Parameter] = []
        for size in [1] * k if self.init == "single" else [k]:
            zero_b = self.init == "single" and initial and r1 == 0
            r1 += size
            a = self._normal(size, d_in)
            b = torch.zeros(d_out, size) if zero_b else self._normal(d_out, size)
            new += layer.append_factors(a, b)
            if triangular:
                rows = torch.zeros(size, r1) if zero_core else self._normal(size, r1)
                cols = torch.zeros(r1, size) if zero_core else self._normal(r1, size)
                new += layer.core.append(rows.to(device), cols.to(device))
            else:
                values = torch.zeros(size) if zero_core else self._normal(size)
                new.append(layer.core.append(values.to(device)))
        layer.scale = self.alpha / (r1 + 1e-5) if self.scaling == "alpha_over_r" else self.scale_constant
        return new
