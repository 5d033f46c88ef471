"""Statistics in fp32 (at least) whatever the precision of the forward: the regulariser and the
allocators' scores use these."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch


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
