"""Toy modules shared by the method tests (kept out of conftest.py, which does not import torch)."""

from __future__ import annotations

from torch import nn


class QueryValue(nn.Module):
    """Two d × d linears named as the methods' target modules (``query``, ``value``); subclasses
    give the forward."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.query = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
