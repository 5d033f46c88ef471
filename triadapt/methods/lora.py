"""LoRA (Hu et al., 2021): ΔW = (α/r) · B A with A ~ Kaiming-uniform, B = 0 at init."""

from __future__ import annotations

import math

import torch
from torch import nn

from triadapt.errors import ConfigError
from triadapt.methods.adapted_linear import AdaptedLinear, optimizer_group
from triadapt.methods.base import Method
from triadapt.methods.cores import IdentityCore
from triadapt.methods.module_discovery import find_target_linears, replace_module


class LoRA(Method):
    name = "lora"

    def __init__(self, cfg, ctx) -> None:
        super().__init__(cfg, ctx)
        self.r = int(cfg.r)
        if self.r <= 0:
            raise ConfigError(f"method.r={cfg.r} must be a positive integer")

    def target_rank(self) -> float:
        return float(self.r)

    def inject(self, model: nn.Module) -> list[dict]:
        for p in model.parameters():
            p.requires_grad_(False)
        params = []
        for name, linear in find_target_linears(model, self.ctx.target_modules):
            if self.r > min(linear.in_features, linear.out_features):
                raise ConfigError(f"method.r={self.r} exceeds min(d_in, d_out) of {name}")
            layer = AdaptedLinear(linear, IdentityCore(), dropout=float(self.cfg.dropout), scale=self.cfg.alpha / self.r)
            a = torch.empty(self.r, linear.in_features)
            # Same init as microsoft/LoRA and peft: A ~ kaiming_uniform(a=√5), B = 0, so ΔW = 0.
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            params += layer.append_factors(a, torch.zeros(linear.out_features, self.r))
            replace_module(model, name, layer)
        return [optimizer_group(params, self.ctx.weight_decay)]
