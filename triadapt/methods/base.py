"""The method interface the training loop talks to, and the method registry.

A method is built from its config (the ``method`` node) and a :class:`RunContext`. The
loop calls every hook on every method and knows none by name:

    groups = method.inject(model)                       # once, before the optimizer exists
    for step in range(total_steps):                     # ``step`` = optimizer steps done so far
        loss = task_loss + method.extra_loss(model)     # regulariser logged on its own
        loss.backward(); clip_grad_norm_(...)
        method.before_step(step, model, optimizer, scheduler)   # growth (IncreLoRA, TriAdaptLoRA)
        optimizer.step(); scheduler.step()
        method.after_step(step, model, optimizer, scheduler)    # masking (AdaLoRA)
        optimizer.zero_grad()
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from triadapt.errors import ConfigError
from triadapt.methods.module_discovery import adapted_layers


@dataclass
class RunContext:
    """What a method needs to know about the run before it is built."""

    total_steps: int
    target_modules: list[str]
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_steps(value: float | int | None, total_steps: int, name: str) -> int | None:
    """A schedule length given as a step count (int) or as a fraction of the run (float in [0, 1])."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be a step count or a fraction of total steps")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name}={value} is a fraction of total steps and must lie in [0, 1] (or pass an int)")
        return int(round(value * total_steps))
    if value < 0:
        raise ConfigError(f"{name}={value} must be >= 0")
    return int(value)


class Method:
    """Base class: every hook is a no-op, so a method overrides only what it needs."""

    name = "base"
    #: whether the method keeps the backbone frozen (False only for full fine-tuning)
    freezes_backbone = True

    def __init__(self, cfg: DictConfig, ctx: RunContext) -> None:
        self.cfg = cfg
        self.ctx = ctx

    # -- lifecycle -----------------------------------------------------------------------
    def inject(self, model: nn.Module) -> list[dict]:
        """Adapt ``model`` in place; return the optimizer param groups of the method's parameters."""
        raise NotImplementedError

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def before_step(self, step: int, model: nn.Module, optimizer, scheduler) -> None:
        pass

    def after_step(self, step: int, model: nn.Module, optimizer, scheduler) -> None:
        pass

    def capture_mode(self, step: int) -> str:
        """What this step's hooks do, for whole-step capture (``train.cuda_graphs``):

        * ``graph`` — before_step/after_step do the same device work on the same tensors at every
          step answered so (or nothing), with no host sync and no new parameters: they are
          recorded with the step and replayed;
        * ``split`` — they do host work (scores, allocation, growth) but forward and backward are
          plain: forward/backward replay as a graph, the hooks and AdamW run eagerly;
        * ``eager`` — the forward or backward does method work (hooks on activations): the whole
          step runs eagerly.

        The default is ``graph`` for a method without step hooks, else ``eager`` (always safe)."""
        plain = type(self).before_step is Method.before_step and type(self).after_step is Method.after_step
        return "graph" if plain else "eager"

    def metrics(self) -> dict[str, float]:
        """Scalars worth logging during training (current total rank, budget b(t), …)."""
        return {}

    # -- resume --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, model: nn.Module, optimizer=None, scheduler=None) -> None:
        """Restore allocator state on resume.

        Called after ``inject`` and after the optimizer and scheduler were built, *before*
        the checkpoint's model, optimizer and scheduler states are loaded: a growing method
        re-creates its grown parameters and param groups here, in the original order, so that
        those states fit.
        """

    # -- accounting ----------------------------------------------------------------------
    def ranks(self, model: nn.Module) -> dict[str, int]:
        """Effective rank per adapted module."""
        return {name: layer.rank for name, layer in adapted_layers(model)}

    def adapter_params(self, model: nn.Module) -> int:
        """Exact count of effective adapter parameters (what the paper's budget counts)."""
        return sum(p.numel() for p in self.adapter_state(model).values())

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors that make up the trained adapter (saved as safetensors)."""
        return {
            name: p.detach()
            for name, p in model.named_parameters()
            if ".lora_" in name or ".core." in name
        }

    def target_rank(self) -> float | None:
        return None

    def report(self, model: nn.Module) -> dict:
        """Budget accounting and allocation history for ``result.json``."""
        return {
            "target_rank": self.target_rank(),
            "adapter_params": self.adapter_params(model),
            "ranks": self.ranks(model),
            "history": [],
        }


_REGISTRY = {
    "full": "triadapt.methods.full:FullFineTuning",
    "lora": "triadapt.methods.lora:LoRA",
    "peft_lora": "triadapt.methods.peft_lora:PeftLoRA",
    "adalora": "triadapt.methods.adalora:AdaLoRA",
    "peft_adalora": "triadapt.methods.peft_adalora:PeftAdaLoRA",
    "increlora": "triadapt.methods.increlora:IncreLoRA",
    "triadapt": "triadapt.methods.triadapt:TriAdaptLoRA",
}


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def register_method(name: str, target: str) -> None:
    """Register ``module.path:ClassName`` under ``name`` (for methods living outside this package)."""
    _REGISTRY[name] = target


def build_method(cfg: DictConfig, ctx: RunContext) -> Method:
    name = cfg.name
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(available_methods())}")
    module, _, cls = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)(cfg, ctx)
