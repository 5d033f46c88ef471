"""AdaLoRA through peft 0.21 (reference backend): same config keys and hooks as method=adalora.

peft's ``AdaLoraModel`` adapts the model in place; no ``PeftModel`` wrapper is built, so the
experiment keeps calling the model itself. Two things peft leaves to the caller here:
``update_and_allocate`` (called from ``after_step``) and the orthogonal regulariser, which peft only
adds inside its own ``forward`` (computed in ``extra_loss`` instead, so it is logged on its own).
"""

from __future__ import annotations

import torch
from peft import AdaLoraConfig
from peft.tuners.adalora import AdaLoraLayer, AdaLoraModel
from torch import nn

from triadapt.errors import ConfigError
from triadapt.methods.adalora import AdaLoRASettings
from triadapt.methods.base import Method, RunContext
from triadapt.methods.module_discovery import find_target_linears

ADAPTER = "default"


def _svd_layers(model: nn.Module) -> list[tuple[str, AdaLoraLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdaLoraLayer)]


class PeftAdaLoRA(Method):
    name = "peft_adalora"

    def __init__(self, cfg, ctx: RunContext) -> None:
        super().__init__(cfg, ctx)
        self.settings = AdaLoRASettings.from_config(cfg, ctx)
        self.schedule = self.settings.schedule
        self.tuner: AdaLoraModel | None = None
        self.n_modules = 0
        self.budget: int | None = None
        self.history: list[dict] = []

    def inject(self, model: nn.Module) -> list[dict]:
        s = self.settings
        linears = find_target_linears(model, self.ctx.target_modules)
        for name, linear in linears:
            s.check_shape(name, linear)
        self.n_modules = len(linears)
        init_budget, target_budget = s.budgets(self.n_modules)
        if init_budget == target_budget:
            # peft would call kthvalue(k=0) at its first allocation.
            raise ConfigError("peft_adalora needs b(T) < b(0): raise method.init_rank or lower the target")
        config = AdaLoraConfig(
            target_r=s.target_rank,
            init_r=s.init_rank,
            lora_alpha=s.alpha,
            lora_dropout=s.dropout,
            target_modules=list(self.ctx.target_modules),
            tinit=self.schedule.tinit,
            tfinal=self.schedule.tfinal,
            deltaT=self.schedule.delta_t,
            beta1=s.beta1,
            beta2=s.beta2,
            orth_reg_weight=s.orth_reg_weight,
            total_step=self.schedule.total_steps,
        )
        # Freezes every non-adapter weight of ``model`` (the experiment re-enables the head).
        self.tuner = AdaLoraModel(model, config, ADAPTER)
        # total_budget overrides peft's target_r · n (identical when it is unset).
        self.tuner.rankallocator.target_bgt = target_budget
        self.budget = init_budget
        params = [p for n, p in model.named_parameters() if ".lora_" in n]
        return [{"params": params, "weight_decay": self.ctx.weight_decay}]

    @property
    def _config(self) -> AdaLoraConfig:
        return self.tuner.peft_config[ADAPTER]

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """γ · mean of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F over all modules, as in AdaLoraModel.forward."""
        if self.settings.orth_reg_weight == 0:
            return None
        terms = []
        for _, layer in _svd_layers(model):
            a, b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
            eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
            terms += [torch.linalg.matrix_norm(a @ a.T - eye), torch.linalg.matrix_norm(b.T @ b - eye)]
        return self.settings.orth_reg_weight * torch.stack(terms).mean()

    def after_step(self, step: int, model: nn.Module, optimizer, scheduler) -> None:
        # peft's global_step has our convention: optimizer steps done before this one.
        self.tuner.update_and_allocate(step)
        allocator = self.tuner.rankallocator
        self.budget, mask_now = allocator.budget_schedule(step)
        final_start = self.schedule.final_start
        if (step < final_start and mask_now) or step == final_start:
            ranks = {n.removesuffix(f".lora_E.{ADAPTER}"): sum(m) for n, m in self._config.rank_pattern.items()}
            if step == final_start or not self.history or ranks != self.history[-1]["ranks"]:
                # peft keeps its threshold local to mask_to_budget.
                self.history.append({"step": step, "budget": self.budget, "threshold": None, "ranks": ranks})

    # -- resume --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        allocator = self.tuner.rankallocator
        pattern = self._config.rank_pattern
        return {
            key: {n: t.clone() for n, t in getattr(allocator, key).items()}
            for key in ("ipt", "exp_avg_ipt", "exp_avg_unc")
        } | {
            "rank_pattern": None if pattern is None else {n: list(m) for n, m in pattern.items()},
            "history": [dict(e, ranks=dict(e["ranks"])) for e in self.history],
            "budget": self.budget,
        }

    def load_state_dict(self, state: dict, model: nn.Module, optimizer=None, scheduler=None) -> None:
        allocator = self.tuner.rankallocator
        params = dict(model.named_parameters())
        # All three dicts are needed: peft re-zeroes the EMAs of a parameter missing from ``ipt``.
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(allocator, key, {n: t.to(params[n].device) for n, t in state[key].items()})
        pattern = state["rank_pattern"]
        self._config.rank_pattern = None if pattern is None else {n: list(m) for n, m in pattern.items()}
        self.history = [dict(e, ranks=dict(e["ranks"])) for e in state["history"]]
        self.budget = state["budget"]

    # -- accounting ----------------------------------------------------------------------
    def ranks(self, model: nn.Module) -> dict[str, int]:
        """Active rank = number of non-zero λ (peft's masks zero them in place)."""
        return {name: int((layer.lora_E[ADAPTER] != 0).sum()) for name, layer in _svd_layers(model)}

    def adapter_params(self, model: nn.Module) -> int:
        layers = dict(_svd_layers(model))
        return sum(r * (layers[n].in_features + layers[n].out_features + 1) for n, r in self.ranks(model).items())

    def target_rank(self) -> float:
        if not self.n_modules:
            return float(self.settings.target_rank)
        return self.tuner.rankallocator.target_bgt / self.n_modules

    def metrics(self) -> dict[str, float]:
        if self.tuner is None:
            return {}
        total = sum(int((layer.lora_E[ADAPTER] != 0).sum()) for _, layer in _svd_layers(self.tuner.model))
        return {"budget": float(self.budget), "total_rank": float(total)}

    def report(self, model: nn.Module) -> dict:
        return super().report(model) | {
            "init_budget": self.tuner.rankallocator.init_bgt,
            "target_budget": self.tuner.rankallocator.target_bgt,
            "history": self.history,
        }
