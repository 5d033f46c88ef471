"""The r×r transformation between A and B of an :class:`~triadapt.methods.adapted_linear.AdaptedLinear`:

* :class:`IdentityCore` — LoRA;
* :class:`DiagonalCore` — a vector λ (AdaLoRA, IncreLoRA);
* :class:`TriangularCore` — a dense matrix C = L + U stored as one flat block per growth event
  holding the new rows of L and columns of U (TriAdaptLoRA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _values(plist: nn.ParameterList) -> list[nn.Parameter]:
    """The parameters of a ParameterList in index order, without its per-item ``__getitem__``."""
    return list(plist._parameters.values())


def _append(plist: nn.ParameterList, p: nn.Parameter) -> None:
    """``plist.append(p)`` without its per-call index arithmetic and ``Module.__setattr__`` dispatch
    (a growth event appends hundreds of parameters); falls back to ``append``."""
    if not hasattr(plist, "_size"):
        plist.append(p)
        return
    n = len(plist)
    plist.register_parameter(str(n), p)
    plist._size = n + 1


class IdentityCore(nn.Module):
    """core = I: plain LoRA."""

    n_components = 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def matrix(self, rank: int) -> torch.Tensor:
        return torch.eye(rank)

    def num_parameters(self) -> int:
        return 0

    def operand(self) -> tuple[str, torch.Tensor | None]:
        """(kind, tensor) of the core for the fused forward."""
        return "identity", None

    def param_list(self) -> list[nn.Parameter]:
        return []


class DiagonalCore(nn.Module):
    """core = diag(λ), λ stored as a list of vectors (one per appended block of ranks)."""

    def __init__(self) -> None:
        super().__init__()
        self.values = nn.ParameterList()
        self._components = 0

    @property
    def n_components(self) -> int:
        return self._components

    def append(self, values: torch.Tensor, trainable: bool = True, components: int = 1) -> nn.Parameter:
        """Append a block of λ values that counts as ``components`` components (1: the block is one;
        len(values): each rank is one, as in TriAdaptLoRA's "single" parametrisation)."""
        p = nn.Parameter(values, requires_grad=trainable)
        _append(self.values, p)
        self._components += components
        return p

    def param_list(self) -> list[nn.Parameter]:
        return _values(self.values)

    def vector(self) -> torch.Tensor:
        values = _values(self.values)
        return values[0] if len(values) == 1 else torch.cat(values)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.vector()

    def matrix(self, rank: int) -> torch.Tensor:
        return torch.diag(self.vector())

    def operand(self) -> tuple[str, torch.Tensor]:
        return "diagonal", self.vector()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.values)


class TriangularCore(nn.Module):
    """core = C = L + U, one flat parameter ("block") per growth event.

    A block covering ranks [r0, r1) holds rows r0..r1−1 of L, then columns r0..r1−1 of U:

    * triangular block (the "single" parametrisation): row i of L holds its entries 0..i and
      column j of U its entries 0..j, so L is lower-, U upper-triangular and the diagonal is
      parametrised twice, as in the author's code; each rank counts as one component;
    * dense block (``block_c0``): rows r0..r1−1 of L over columns 0..r1−1 (row-major), then
      rows 0..r1−1 of U over columns r0..r1−1 (row-major); the block counts as one component.

    A block of one rank is the same in both forms. The tensors of a module grow with its growth
    events, not with its rank.
    """

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ParameterList()
        self.spans: list[tuple[int, int, bool]] = []  # (r0, r1, triangular) per block
        self._pos: torch.Tensor | None = None

    @staticmethod
    def block_numel(r0: int, r1: int, triangular: bool) -> int:
        return (r1 * (r1 + 1) - r0 * (r0 + 1)) if triangular else 2 * (r1 - r0) * r1

    @property
    def n_components(self) -> int:
        return sum(r1 - r0 if tri else 1 for r0, r1, tri in self.spans)

    @property
    def rank(self) -> int:
        return self.spans[-1][1] if self.spans else 0

    def param_list(self) -> list[nn.Parameter]:
        return _values(self.blocks)

    def append(self, values: torch.Tensor, k: int, triangular: bool = True) -> nn.Parameter:
        """Append ranks [rank, rank + k) stored in the flat ``values`` (layout in the class docstring)."""
        r0 = self.rank
        r1 = r0 + k
        if values.dim() != 1 or values.numel() != self.block_numel(r0, r1, triangular):
            raise ValueError(f"core block of shape {tuple(values.shape)} does not extend rank {r0} by {k}")
        p = nn.Parameter(values)
        _append(self.blocks, p)
        self.spans.append((r0, r1, triangular))
        self._pos = None
        return p

    def _positions(self, device: torch.device) -> torch.Tensor:
        # Flat position in the r×r matrix of every stored value, in storage order (a diagonal
        # position occurs twice: once for L, once for U); rebuilt only when the structure grows.
        if self._pos is None or self._pos.device != device:
            r, pos = self.rank, []
            for r0, r1, tri in self.spans:
                pos += [i * r + c for i in range(r0, r1) for c in range(i + 1 if tri else r1)]
                if tri:
                    pos += [i * r + j for j in range(r0, r1) for i in range(j + 1)]
                else:
                    pos += [i * r + j for i in range(r1) for j in range(r0, r1)]
            self._pos = torch.tensor(pos, dtype=torch.long, device=device)
        return self._pos

    def _flat(self) -> torch.Tensor:
        blocks = _values(self.blocks)
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def _part(self, lower: bool) -> torch.Tensor:
        r = self.rank
        flat = self._flat()
        is_lower = torch.cat([torch.arange(self.block_numel(r0, r1, tri)) < self.block_numel(r0, r1, tri) // 2
                              for r0, r1, tri in self.spans]).to(flat.device)
        keep = is_lower if lower else ~is_lower
        return flat.new_zeros(r * r).index_put((self._positions(flat.device)[keep],), flat[keep]).view(r, r)

    def lower(self) -> torch.Tensor:
        return self._part(lower=True)

    def upper(self) -> torch.Tensor:
        return self._part(lower=False)

    def matrix(self, rank: int | None = None) -> torch.Tensor:
        """C = L + U: one concatenation and one accumulating scatter, whatever the number of blocks."""
        r = self.rank
        flat = self._flat()
        return flat.new_zeros(r * r).index_put((self._positions(flat.device),), flat, accumulate=True).view(r, r)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.matrix())

    def operand(self) -> tuple[str, torch.Tensor]:
        return "matrix", self.matrix()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.blocks)
