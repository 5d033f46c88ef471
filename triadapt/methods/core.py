"""The shared core: one adapted linear layer for every low-rank method.

    y = W0 x + b + scale · B · core · A · dropout(x)

computed in factored form (ΔW is never materialised on the forward path). The rank is
held as *blocks*: A is the row-concatenation of ``lora_A[i]`` and B the column-concatenation of
``lora_B[i]``. A growing method appends one block per module and growth event (whatever the
number of ranks it adds) as new ``nn.Parameter`` objects, so existing tensors and their optimizer
state stay untouched, and the number of tensors grows with the events, not with the rank.

The forward is one autograd node (:class:`_LowRankLinear`) for the frozen base and the adapter
together: the scale multiplies the N×r intermediate, never the N×d_out output; the up-projection
accumulates in place into the base output; the backward forms ∂x = g·W + ĝ·A as one GEMM plus an
in-place rank-r update. Concatenated factors and the core are built once per parameter version
(:class:`_Cache`): the forward, the regulariser and the scores of a step share them.

``core`` is the r×r transformation between A and B:

* :class:`IdentityCore` — LoRA;
* :class:`DiagonalCore` — a vector λ (AdaLoRA, IncreLoRA);
* :class:`TriangularCore` — a dense matrix C = L + U stored as one flat block per growth event
  holding the new rows of L and columns of U (TriAdaptLoRA).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn


@contextmanager
def fp32_statistics():
    """Autocast off: the regulariser and the allocators' statistics are computed in fp32 whatever
    the precision of the forward (under bf16 autocast, ‖AAᵀ − I‖ of a near-orthonormal A would be
    mostly rounding error)."""
    with ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 when it is in a lower precision (fp64 stays fp64); no copy when already there."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class _Cache:
    """One cached value keyed by parameter versions; dropped by deepcopy and pickling (it may hold
    non-leaf tensors of the current autograd graph)."""

    __slots__ = ("key", "value")

    def __init__(self) -> None:
        self.key = None
        self.value = None

    def __deepcopy__(self, memo) -> _Cache:
        return _Cache()

    def __getstate__(self):
        return None

    def __setstate__(self, state) -> None:
        self.key = self.value = None

    def get(self, key, build):
        if key != self.key:
            self.value = build()
            self.key = key
        return self.value

    def clear(self) -> None:
        self.key = self.value = None


def _version_key(params) -> tuple:
    """Changes whenever a parameter is updated in place, replaced, (un)frozen, or the grad mode flips."""
    return (torch.is_grad_enabled(), *((p._version, p.data_ptr(), p.requires_grad) for p in params))


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


def _lowrank_forward(x, xd, weight, bias, a, b, core, kind, scale):
    """out = x Wᵀ + b + scale · core(x_d Aᵀ) Bᵀ on 2-D x; returns (out, h, u) with h = x_d Aᵀ, u = core(h)."""
    out = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    h = torch.mm(x if xd is None else xd, a.t())
    if kind == "identity":
        u = h
    elif kind == "diagonal":
        u = h * core
    else:
        u = torch.mm(h, core.t())
    out.addmm_(u, b.t(), alpha=scale)  # the scale rides on BLAS' alpha: no N×d_out temporary
    return out, h, u


class _LowRankLinear(torch.autograd.Function):
    """The frozen base and the adapter of one :class:`AdaptedLinear` as a single autograd node.

    Backward, with g = ∂L/∂out (N×d_out) and ĝ = ∂L/∂h (N×r):
    ∂B = s·(uᵀg)ᵀ (computed as r×d_out: the fast layout), ∂u = s·g B, ∂core from ∂u and h,
    ∂A = ĝᵀ x_d, and ∂x = g W + ĝ A as one GEMM plus an in-place rank-r update when the adapter sees
    x itself (no dropout): no second N×d_in gradient, no sum of two.
    """

    @staticmethod
    def forward(ctx, x, xd, weight, bias, a, b, core, kind, scale):
        out, h, u = _lowrank_forward(x, xd, weight, bias, a, b, core, kind, scale)
        keep_x = xd is None or weight.requires_grad
        ctx.save_for_backward(x if keep_x else None, xd, weight, a, b, core, h if kind != "identity" else None, u)
        ctx.kind, ctx.scale = kind, scale
        return out

    @staticmethod
    def backward(ctx, g):
        x, xd, weight, a, b, core, h, u = ctx.saved_tensors
        kind, s = ctx.kind, ctx.scale
        need_x, need_xd, need_w, need_bias, need_a, need_b, need_core = ctx.needs_input_grad[:7]
        g = g.contiguous()
        gb = torch.mm(u.t(), g).mul_(s).t() if need_b else None
        gu = torch.mm(g, b).mul_(s)
        gcore = None
        if kind == "identity":
            gh = gu
        elif kind == "diagonal":
            gcore = (gu * h).sum(0) if need_core else None
            gh = gu * core
        else:
            gcore = torch.mm(gu.t(), h) if need_core else None
            gh = torch.mm(gu, core)
        src = x if xd is None else xd
        ga = torch.mm(gh.t(), src) if need_a else None
        gx = gxd = None
        if need_x:
            gx = torch.mm(g, weight)
            if xd is None:
                gx.addmm_(gh, a)
        if need_xd:
            gxd = torch.mm(gh, a)
        gw = torch.mm(g.t(), x) if need_w else None
        gbias = g.sum(0) if need_bias else None
        return gx, gxd, gw, gbias, ga, gb, gcore, None, None


def _apply_core(h: torch.Tensor, core: torch.Tensor | None, kind: str) -> torch.Tensor:
    """u = core(h) for rows h (N×r)."""
    if kind == "identity":
        return h
    return h * core if kind == "diagonal" else torch.mm(h, core.t())


def _folded_weight(weight, a, b, core, kind, scale) -> torch.Tensor:
    """W + scale · B · core · A (d_out×d_in): the adapter folded into the frozen weight."""
    bc = b if kind == "identity" else (b * core if kind == "diagonal" else torch.mm(b, core))
    return torch.addmm(weight, bc, a, alpha=scale)


#: rows per block when the factor gradients are accumulated block by block (see _FoldedLowRankLinear)
FOLD_BLOCK_ROWS = 1024


def fold_pays(n_rows: int, d_in: int, d_out: int) -> bool:
    """Folding costs two weight-sized passes, the factored form two activation-sized ones (N×d_out
    out and N×d_in ∂x updates): fold when the activations outweigh the weight twice over."""
    return n_rows * (d_in + d_out) >= 2 * d_in * d_out


class _FoldedLowRankLinear(torch.autograd.Function):
    """y = x (W + s·B·core·A)ᵀ + b for an adapter that sees x itself (no dropout).

    The adapter is folded into the frozen weight (a d_out×d_in sum, cheap next to an activation
    of batch·sequence rows): the forward is one GEMM, ∂x = g (W + s·B·core·A) is one GEMM, and no
    activation-sized adapter pass remains in either. The factor gradients stay factored:
    h = x Aᵀ is recomputed in backward and ∂B = s·(uᵀg)ᵀ, ∂core, ∂A = ĝᵀ x are accumulated block
    by block of rows, so that each block of x and g is read from memory once for its two products.
    Mathematically the same map as :class:`_LowRankLinear`; only the rounding differs.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, core, kind, scale):
        w = _folded_weight(weight, a, b, core, kind, scale)
        out = torch.addmm(bias, x, w.t()) if bias is not None else torch.mm(x, w.t())
        ctx.save_for_backward(x, weight, a, b, core)
        ctx.kind, ctx.scale = kind, scale
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, a, b, core = ctx.saved_tensors
        kind, s = ctx.kind, ctx.scale
        need_x, need_w, need_bias, need_a, need_b, need_core = ctx.needs_input_grad[:6]
        g = g.contiguous()
        gx = torch.mm(g, _folded_weight(weight, a, b, core, kind, s)) if need_x else None
        gw = torch.mm(g.t(), x) if need_w else None
        gbias = g.sum(0) if need_bias else None
        ga = gb = gcore = None
        if need_a or need_b or need_core:
            r = a.shape[0]
            gbt = g.new_zeros(r, g.shape[1])  # ∂Bᵀ / s
            ga = a.new_zeros(a.shape)  # ∂A / s
            gcore = None if kind == "identity" else core.new_zeros(core.shape)  # ∂core / s
            at = a.t()
            for r0 in range(0, x.shape[0], FOLD_BLOCK_ROWS):
                xb, gblk = x[r0 : r0 + FOLD_BLOCK_ROWS], g[r0 : r0 + FOLD_BLOCK_ROWS]
                h = torch.mm(xb, at)
                gbt.addmm_(_apply_core(h, core, kind).t(), gblk)
                gu = torch.mm(gblk, b)
                if kind == "identity":
                    gh = gu
                elif kind == "diagonal":
                    gcore.add_((gu * h).sum(0))
                    gh = gu * core
                else:
                    gcore.addmm_(gu.t(), h)
                    gh = torch.mm(gu, core)
                ga.addmm_(gh.t(), xb)
            gb = gbt.mul_(s).t() if need_b else None
            ga = ga.mul_(s) if need_a else None
            gcore = gcore.mul_(s) if need_core and gcore is not None else None
        return gx, gw, gbias, ga, gb, gcore, None, None


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
        self._factors = _Cache()
        self._folded = _Cache()  # W + s·B·core·A for evaluation (no grad)
        self._rank = [0, 0]  # [components counted, rank], updated in place

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
        n, rank = self._rank
        if n != len(self.lora_A):  # recounted only when components were appended
            self._rank[:] = [len(self.lora_A), sum(a.shape[0] for a in _values(self.lora_A))]
        return self._rank[1]

    def append_factors(self, a: torch.Tensor, b: torch.Tensor, trainable: bool = True) -> list[nn.Parameter]:
        """Append k components: ``a`` is k × d_in, ``b`` is d_out × k."""
        if a.shape[1] != self.in_features or b.shape[0] != self.out_features or a.shape[0] != b.shape[1]:
            raise ValueError(f"factor shapes {tuple(a.shape)} / {tuple(b.shape)} do not fit {self.base}")
        device = self.base.weight.device
        pa = nn.Parameter(a.to(device), requires_grad=trainable)
        pb = nn.Parameter(b.to(device), requires_grad=trainable)
        _append(self.lora_A, pa)
        _append(self.lora_B, pb)
        return [pa, pb]

    def _params(self) -> list[nn.Parameter]:
        core = self.core.param_list() if hasattr(self.core, "param_list") else list(self.core.parameters())
        return _values(self.lora_A) + _values(self.lora_B) + core

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, str | None, torch.Tensor | None]:
        """(A, B, core kind, core operand), concatenated once per parameter version and grad mode.

        kind is None for a core without ``operand`` (the forward then calls the core module). In grad
        mode the cached tensors belong to the current autograd graph: a backward through them drops
        the cache (the graph's saved tensors are freed), so a later forward rebuilds them."""
        return self._factors.get(_version_key(self._params()), self._build_factors)

    def _build_factors(self):
        a_parts, b_parts = _values(self.lora_A), _values(self.lora_B)
        a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, dim=0)
        b = b_parts[0] if len(b_parts) == 1 else torch.cat(b_parts, dim=1)
        kind, core = self.core.operand() if hasattr(self.core, "operand") else (None, None)
        cache = self._factors
        for t in (a, b, core):
            if t is not None and t.grad_fn is not None:
                t.register_hook(lambda grad, cache=cache: cache.clear())
        return a, b, kind, core

    def A(self) -> torch.Tensor:
        return self.factors()[0]

    def B(self) -> torch.Tensor:
        return self.factors()[1]

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scale · B · core · A (d_out × d_in), in fp32. For scores and merging only."""
        if not self.rank:
            return at_least_fp32(self.base.weight.new_zeros(self.out_features, self.in_features))
        with fp32_statistics():
            a = at_least_fp32(self.A())
            return self.scale * (at_least_fp32(self.B()) @ at_least_fp32(self.core(a.T)).T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not len(self.lora_A):
            return self.base(x)
        xd = self.dropout(x)  # nn.Identity when p = 0: no copy (IncreLoRA hooks this module's output)
        a, b, kind, core = self.factors()
        w, bias = self.base.weight, self.base.bias
        if kind is None or not _fusable(x, w, a, b, core, bias):
            h = self.core(F.linear(xd, a))
            return self.base(x) + F.linear(h, b) * self.scale
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        scale = float(self.scale)
        grad = torch.is_grad_enabled()
        if grad:
            self._folded.clear()  # the evaluation cache holds a weight-sized tensor
        if xd is x and fold_pays(x2.shape[0], w.shape[1], w.shape[0]):
            if grad:
                out = _FoldedLowRankLinear.apply(x2, w, bias, a, b, core, kind, scale)
            else:  # evaluation: the folded weight is reused until a parameter changes
                key = (_version_key(self._params()), w._version, w.data_ptr(), scale)
                fw = self._folded.get(key, lambda: _folded_weight(w, a, b, core, kind, scale).detach())
                out = torch.addmm(bias, x2, fw.t()) if bias is not None else torch.mm(x2, fw.t())
        else:
            xd2 = None if xd is x else xd.reshape(-1, xd.shape[-1])
            if grad:
                out = _LowRankLinear.apply(x2, xd2, w, bias, a, b, core, kind, scale)
            else:
                out = _lowrank_forward(x2, xd2, w, bias, a, b, core, kind, scale)[0]
        return out.view(*lead, out.shape[-1])


def optimizer_group(params: list[nn.Parameter], weight_decay: float) -> dict:
    """An optimizer param group of adapter parameters (the kernel choice is the optimizer's: see
    :func:`triadapt.train.build_optimizer`)."""
    return {"params": params, "weight_decay": weight_decay}


def _fusable(x, w, a, b, core, bias) -> bool:
    """The fused node needs one dtype throughout and no autocast (which would change dtypes inside)."""
    if x.dim() == 0 or torch.is_autocast_enabled(x.device.type):
        return False
    dt = x.dtype
    return (w.dtype == a.dtype == b.dtype == dt and (bias is None or bias.dtype == dt)
            and (core is None or core.dtype == dt))


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
    """Mean over all A and B of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F (unsquared, as in the authors' code).

    Factors of equal shape are stacked and reduced by one batched product and one batched norm:
    a fixed number of operations per shape, not per module."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for layer in layers:
        a, b = layer.A(), layer.B()
        groups.setdefault(("A", tuple(a.shape), a.device, a.dtype), []).append(a)
        # BᵀB of a d_out × r factor is the Gram matrix of its transpose, r × d_out
        groups.setdefault(("B", tuple(b.shape), b.device, b.dtype), []).append(b.t())
    terms = []
    with fp32_statistics():  # in fp32 (at least) even inside the forward's autocast
        for (_, shape, device, _), mats in groups.items():
            m = at_least_fp32(mats[0].unsqueeze(0) if len(mats) == 1 else torch.stack(mats))
            eye = torch.eye(m.shape[1], device=device, dtype=m.dtype)
            terms.append(torch.linalg.matrix_norm(m @ m.transpose(1, 2) - eye))
        return torch.cat(terms).mean()


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
