"""The shared core: one adapted linear layer for every low-rank method.

    y = W0 x + b + scale · B · core · A · dropout(x)

computed in factored form (ΔW is never materialised on the forward path). The rank is
held as *components*: A is the row-concatenation of ``lora_A[i]`` and B the
column-concatenation of ``lora_B[i]``. Growing methods append components as new
``nn.Parameter`` objects, so existing tensors and their optimizer state stay untouched.

``core`` is the r×r transformation between A and B:

* :class:`IdentityCore` — LoRA;
* :class:`DiagonalCore` — a vector λ (AdaLoRA, IncreLoRA);
* :class:`TriangularCore` — a dense matrix C = L + U whose lower part is stored row-block
  by row-block and whose upper part column-block by column-block (TriAdaptLoRA).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


class IdentityCore(nn.Module):
    """core = I: plain LoRA."""

    n_components = 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def matrix(self, rank: int) -> torch.Tensor:
        return torch.eye(rank)

    def num_parameters(self) -> int:
        return 0


class DiagonalCore(nn.Module):
    """core = diag(λ), λ stored as a list of vectors (one per appended component block)."""

    def __init__(self) -> None:
        super().__init__()
        self.values = nn.ParameterList()
        self._cache: torch.Tensor | None = None

    @property
    def n_components(self) -> int:
        return len(self.values)

    def append(self, values: torch.Tensor, trainable: bool = True) -> nn.Parameter:
        p = nn.Parameter(values, requires_grad=trainable)
        self.values.append(p)
        return p

    def vector(self) -> torch.Tensor:
        if len(self.values) == 1:
            return self.values[0]
        return torch.cat(list(self.values))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.vector()

    def matrix(self, rank: int) -> torch.Tensor:
        return torch.diag(self.vector())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.values)


class TriangularCore(nn.Module):
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

    @property
    def n_components(self) -> int:
        return len(self.rows)

    @property
    def rank(self) -> int:
        return self.rows[-1].shape[1] if len(self.rows) else 0

    def append(self, rows: torch.Tensor, cols: torch.Tensor) -> list[nn.Parameter]:
        r1 = rows.shape[1]
        k = rows.shape[0]
        if cols.shape != (r1, k) or r1 != self.rank + k:
            raise ValueError(f"block shapes {tuple(rows.shape)} / {tuple(cols.shape)} do not extend rank {self.rank}")
        new = [nn.Parameter(rows), nn.Parameter(cols)]
        self.rows.append(new[0])
        self.cols.append(new[1])
        self._index = None
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

    def matrix(self, rank: int | None = None) -> torch.Tensor:
        return self.lower() + self.upper()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.matrix())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.rows) + sum(p.numel() for p in self.cols)


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` plus ``scale · B · core · A · dropout(x)``."""

    def __init__(self, base: nn.Linear, core: nn.Module, dropout: float = 0.0, scale: float = 1.0) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.core = core
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = scale

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # modules that read ``.weight`` (dtype checks) keep working
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def rank(self) -> int:
        """Number of components held (including any a method treats as inactive)."""
        return sum(a.shape[0] for a in self.lora_A)

    def append_factors(self, a: torch.Tensor, b: torch.Tensor, trainable: bool = True) -> list[nn.Parameter]:
        """Append k components: ``a`` is k × d_in, ``b`` is d_out × k."""
        if a.shape[1] != self.in_features or b.shape[0] != self.out_features or a.shape[0] != b.shape[1]:
            raise ValueError(f"factor shapes {tuple(a.shape)} / {tuple(b.shape)} do not fit {self.base}")
        pa = nn.Parameter(a.to(self.base.weight.device), requires_grad=trainable)
        pb = nn.Parameter(b.to(self.base.weight.device), requires_grad=trainable)
        self.lora_A.append(pa)
        self.lora_B.append(pb)
        return [pa, pb]

    def A(self) -> torch.Tensor:
        return self.lora_A[0] if len(self.lora_A) == 1 else torch.cat(list(self.lora_A), dim=0)

    def B(self) -> torch.Tensor:
        return self.lora_B[0] if len(self.lora_B) == 1 else torch.cat(list(self.lora_B), dim=1)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scale · B · core · A (d_out × d_in). For scores and merging only."""
        a = self.A()
        return self.scale * (self.B() @ self.core(a.T).T) if self.rank else self.base.weight.new_zeros(
            self.out_features, self.in_features
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not len(self.lora_A):
            return out
        h = F.linear(self.dropout(x), self.A())
        h = self.core(h)
        return out + F.linear(h, self.B()) * self.scale


def module_matches(name: str, patterns: Iterable[str]) -> bool:
    """A module name matches a target pattern when it ends with it at a dot boundary."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_target_linears(model: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Linear]]:
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and module_matches(name, patterns)
    ]
    if not found:
        raise ValueError(f"no nn.Linear matches target modules {patterns}")
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, AdaptedLinear):
            yield name, mod


def orthogonal_regulariser(layers: Iterable[AdaptedLinear]) -> torch.Tensor:
    """Mean over all A and B of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F (unsquared, as in the authors' code)."""
    terms = []
    for layer in layers:
        a, b = layer.A(), layer.B()
        eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
        terms.append(torch.linalg.matrix_norm(a @ a.T - eye))
        terms.append(torch.linalg.matrix_norm(b.T @ b - eye))
    return torch.stack(terms).mean()


_LAYER_RE = re.compile(r"\.(\d+)\.")


def layer_index(module_name: str) -> int | None:
    """Transformer layer number in a module name (``encoder.layer.3.attention…`` → 3)."""
    m = _LAYER_RE.search(module_name)
    return int(m.group(1)) if m else None


def matrix_type(module_name: str, patterns: list[str]) -> str:
    """The target pattern a module name matched (e.g. ``attention.output.dense``)."""
    for p in sorted(patterns, key=len, reverse=True):
        if module_name == p or module_name.endswith("." + p):
            return p
    return module_name
