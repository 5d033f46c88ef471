"""Which ``nn.Linear`` modules of a model a method adapts, swapping them, and finding the adapted ones."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from torch import nn

from triadapt.methods.adapted_linear import AdaptedLinear


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
