"""The orthogonality regulariser of AdaLoRA, IncreLoRA and TriAdaptLoRA (methods.md §2.4, §3.6, §4.5)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from triadapt.methods.adapted_linear import AdaptedLinear
from triadapt.methods.fp32_statistics import at_least_fp32, fp32_statistics


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
