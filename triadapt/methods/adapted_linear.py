"""One adapted linear layer for every low-rank method.

    y = W0 x + b + scale · B · core · A · dropout(x)

computed in factored form (ΔW is never materialised on the forward path). The rank is
held as *blocks*: A is the row-concatenation of ``lora_A[i]`` and B the column-concatenation of
``lora_B[i]``. A growing method appends one block per module and growth event (whatever the
number of ranks it adds) as new ``nn.Parameter`` objects, so existing tensors and their optimizer
state stay untouched, and the number of tensors grows with the events, not with the rank.

The forward is one autograd node (:mod:`triadapt.methods.lowrank_kernels`) for the frozen base and
the adapter together. Concatenated factors and the core are built once per parameter version
(:class:`_Cache`): the forward, the regulariser and the scores of a step share them. The cores
are in :mod:`triadapt.methods.cores`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from triadapt.methods.cores import _append, _values
from triadapt.methods.fp32_statistics import at_least_fp32, fp32_statistics
from triadapt.methods.lowrank_kernels import (
    _folded_weight,
    _FoldedLowRankLinear,
    _fusable,
    _lowrank_forward,
    _LowRankLinear,
    fold_pays,
)


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
        return self._factors.get(_version_key(self._params()), self._build_unhooked)

    def _build_unhooked(self):
        # Built outside any activation checkpoint's saved-tensor hooks: its recomputation gets the
        # factors from the cache and must not expect their saved tensors again.
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            return self._build_factors()

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
