"""AdaLoRA (Zhang et al., 2023): ΔW = P Λ Q, with singular values masked by importance (methods.md §2).

On the shared core one component block holds the r triplets: Q = ``lora_A[0]`` (r×d_in, code
``lora_A``), P = ``lora_B[0]`` (d_out×r, code ``lora_B``) and λ = ``core.values[0]`` (length r,
code ``lora_E``). The scale α/(r_init + 1e-5) never changes: the authors found that rescaling after
masking hurts (§2.1).

Pruning is a mask: only λ entries are zeroed, P and Q keep training, so a masked triplet can come
back at the next allocation (§2.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from triadapt.errors import ConfigError
from triadapt.methods.adapted_linear import AdaptedLinear, optimizer_group
from triadapt.methods.base import Method, RunContext, resolve_steps
from triadapt.methods.cores import DiagonalCore
from triadapt.methods.fp32_statistics import at_least_fp32, fp32_statistics
from triadapt.methods.module_discovery import adapted_layers, find_target_linears, replace_module
from triadapt.methods.orthogonal_regulariser import orthogonal_regulariser


@dataclass(frozen=True)
class BudgetSchedule:
    """b(t), the total number of unmasked triplets after step t (§2.3)."""

    total_steps: int
    tinit: int
    tfinal: int
    delta_t: int

    @property
    def final_start(self) -> int:
        """First step of the final phase: the allocation is frozen here."""
        return self.total_steps - self.tfinal

    def __call__(self, step: int, init_budget: int, target_budget: int) -> tuple[int, bool]:
        """(b(step), whether to mask at this step)."""
        if step <= self.tinit:
            return init_budget, False
        if step > self.final_start:
            return target_budget, True
        # Cubic decay with the code's numerator (t − t_i), not eq. 14's (t − t_i − t_f).
        remaining = 1 - (step - self.tinit) / (self.final_start - self.tinit)
        return int((init_budget - target_budget) * remaining**3 + target_budget), step % self.delta_t == 0


@dataclass(frozen=True)
class AdaLoRASettings:
    """The ``method`` node of adalora / peft_adalora, validated and with step counts resolved."""

    target_rank: float
    init_rank: int
    total_budget: int | None
    alpha: float
    dropout: float
    beta1: float
    beta2: float
    orth_reg_weight: float
    schedule: BudgetSchedule

    @classmethod
    def from_config(cls, cfg, ctx: RunContext) -> AdaLoRASettings:
        target = cfg.target_rank
        if target is None or target <= 0:
            raise ConfigError(f"method.target_rank={target} must be positive")
        init = math.ceil(1.5 * target) if cfg.init_rank is None else int(cfg.init_rank)
        if init < target:
            raise ConfigError(f"method.init_rank={init} is below method.target_rank={target}; AdaLoRA only prunes")
        if cfg.total_budget is not None and cfg.total_budget <= 0:
            raise ConfigError(f"method.total_budget={cfg.total_budget} must be positive")
        if cfg.deltaT is None or cfg.deltaT <= 0:
            raise ConfigError(f"method.deltaT={cfg.deltaT} must be a positive step count or fraction")
        for key in ("beta1", "beta2"):
            if not 0 < cfg[key] < 1:
                raise ConfigError(f"method.{key}={cfg[key]} must lie in (0, 1)")
        if cfg.orth_reg_weight < 0:
            raise ConfigError(f"method.orth_reg_weight={cfg.orth_reg_weight} must be >= 0")
        total = ctx.total_steps
        tinit = resolve_steps(cfg.tinit, total, "method.tinit") or 0
        tfinal = resolve_steps(cfg.tfinal, total, "method.tfinal") or 0
        # A positive fraction of a short run can round to 0 steps; mask every step then.
        delta_t = max(1, resolve_steps(cfg.deltaT, total, "method.deltaT"))
        if tinit >= total - tfinal:
            raise ConfigError(
                f"method.tinit={tinit} >= total_steps - tfinal = {total} - {tfinal}: no budgeting phase; "
                "lower tinit/tfinal or train longer"
            )
        return cls(
            target_rank=target,
            init_rank=init,
            total_budget=None if cfg.total_budget is None else int(cfg.total_budget),
            alpha=float(cfg.alpha),
            dropout=float(cfg.dropout),
            beta1=float(cfg.beta1),
            beta2=float(cfg.beta2),
            orth_reg_weight=float(cfg.orth_reg_weight),
            schedule=BudgetSchedule(total, tinit, tfinal, delta_t),
        )

    def check_shape(self, name: str, linear: nn.Linear) -> None:
        if self.init_rank > min(linear.in_features, linear.out_features):
            raise ConfigError(f"method.init_rank={self.init_rank} exceeds min(d_in, d_out) of {name}")

    def budgets(self, n_modules: int) -> tuple[int, int]:
        """(b(0), b(T)): b(T) is total_budget when set, else target_rank per module."""
        init = self.init_rank * n_modules
        target = self.total_budget if self.total_budget is not None else round(self.target_rank * n_modules)
        if target > init:
            raise ConfigError(f"final budget b(T)={target} exceeds the initial budget b(0)={init}")
        return init, target


class AdaLoRA(Method):
    name = "adalora"

    def __init__(self, cfg, ctx: RunContext) -> None:
        super().__init__(cfg, ctx)
        self.settings = AdaLoRASettings.from_config(cfg, ctx)
        self.schedule = self.settings.schedule
        self.layers: list[tuple[str, AdaptedLinear]] = []
        self.init_budget = self.target_budget = 0
        self.budget: int | None = None
        self.threshold: float | None = None
        # Per module, EMAs for [Q, P, λ]; created at the first update, on the parameters' device.
        self.ema_ipt: dict[str, list[torch.Tensor]] = {}
        self.ema_unc: dict[str, list[torch.Tensor]] = {}
        self.pattern: dict[str, torch.Tensor] | None = None  # active triplets frozen for the final phase
        self.history: list[dict] = []

    # -- injection -----------------------------------------------------------------------
    def inject(self, model: nn.Module) -> list[dict]:
        for p in model.parameters():
            p.requires_grad_(False)
        s, r = self.settings, self.settings.init_rank
        params = []
        for name, linear in find_target_linears(model, self.ctx.target_modules):
            s.check_shape(name, linear)
            layer = AdaptedLinear(linear, DiagonalCore(), dropout=s.dropout, scale=s.alpha / (r + 1e-5))
            like = {"dtype": linear.weight.dtype, "device": linear.weight.device}
            # λ = 0 and P, Q ~ N(0, 0.02²): ΔW = 0 at step 0.
            params += layer.append_factors(
                torch.empty(r, linear.in_features, **like).normal_(0.0, 0.02),
                torch.empty(linear.out_features, r, **like).normal_(0.0, 0.02),
            )
            params.append(layer.core.append(torch.zeros(r, **like)))
            replace_module(model, name, layer)
            self.layers.append((name, layer))
        self.init_budget, self.target_budget = s.budgets(len(self.layers))
        self.budget = self.init_budget
        return [optimizer_group(params, self.ctx.weight_decay)]

    @staticmethod
    def _triplet_params(layer: AdaptedLinear) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        return layer.lora_A[0], layer.lora_B[0], layer.core.values[0]

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.settings.orth_reg_weight == 0:
            return None
        return self.settings.orth_reg_weight * orthogonal_regulariser(layer for _, layer in adapted_layers(model))

    # -- allocation ----------------------------------------------------------------------
    def capture_mode(self, step: int) -> str:
        # Final phase: the fixed pattern's masked_fill_ on the same tensors every step. Before it:
        # importance statistics and a budget schedule with host-side decisions.
        return "graph" if step > self.schedule.final_start and self.pattern is not None else "split"

    def after_step(self, step: int, model: nn.Module, optimizer, scheduler) -> None:
        # ``step`` counts the optimizer steps done before this one, like peft's global_step.
        final_start = self.schedule.final_start
        if step > final_start:
            self._apply(self.pattern)
            return
        if step < final_start:  # importance is frozen from the final phase on
            self._update_importance()
        self.budget, mask_now = self.schedule(step, self.init_budget, self.target_budget)
        if mask_now or step == final_start:
            self._mask_to_budget(step, final=step == final_start)

    @torch.no_grad()
    def _update_importance(self) -> None:
        """§2.2: I = |w·∂L/∂w|, Ī ← β1 Ī + (1−β1) I, Ū ← β2 Ū + (1−β2) |I − Ī|, per entry.

        Multi-tensor (foreach) kernels over every Q, P and λ at once, the same operations in the same
        order as the per-tensor formula (bitwise-identical), not ~10 small ops per tensor."""
        b1, b2 = self.settings.beta1, self.settings.beta2
        names, params, ipts, uncs = [], [], [], []
        for name, layer in self.layers:
            triplet = self._triplet_params(layer)
            if name not in self.ema_ipt:  # at least fp32 whatever the parameters' dtype
                self.ema_ipt[name] = [at_least_fp32(torch.zeros_like(p)) for p in triplet]
                self.ema_unc[name] = [at_least_fp32(torch.zeros_like(p)) for p in triplet]
            names.append(name)
            params += triplet
            ipts += self.ema_ipt[name]
            uncs += self.ema_unc[name]
        with fp32_statistics():  # no copies for fp32 parameters
            ipt = torch._foreach_mul([at_least_fp32(p) for p in params], [at_least_fp32(p.grad) for p in params])
            torch._foreach_abs_(ipt)
            new_ipt = torch._foreach_mul(ipts, b1)
            torch._foreach_add_(new_ipt, torch._foreach_mul(ipt, 1 - b1))
            dev = torch._foreach_sub(ipt, new_ipt)
            torch._foreach_abs_(dev)
            torch._foreach_mul_(dev, 1 - b2)
            new_unc = torch._foreach_mul(uncs, b2)
            torch._foreach_add_(new_unc, dev)
        for i, name in enumerate(names):
            self.ema_ipt[name] = new_ipt[3 * i : 3 * i + 3]
            self.ema_unc[name] = new_unc[3 * i : 3 * i + 3]

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """S_{k,i} = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij), with s = Ī·Ū."""
        scores = {}
        for name, _ in self.layers:
            s_q, s_p, s_lambda = (i * u for i, u in zip(self.ema_ipt[name], self.ema_unc[name]))
            scores[name] = s_lambda + (s_q.mean(dim=1) + s_p.mean(dim=0))
        return scores

    def _mask_to_budget(self, step: int, final: bool) -> None:
        scores = self.triplet_scores()
        k = self.init_budget - self.budget
        # The k lowest scores over all modules go; k = 0 (b(t) = b(0)) masks nothing.
        self.threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values.item() if k > 0 else None
        active = {
            name: s > self.threshold if self.threshold is not None else torch.ones_like(s, dtype=torch.bool)
            for name, s in scores.items()
        }
        self._apply(active)
        if final:
            self.pattern = active
        ranks = {name: int(a.sum()) for name, a in active.items()}
        if final or not self.history or ranks != self.history[-1]["ranks"]:
            self.history.append({"step": step, "budget": self.budget, "threshold": self.threshold, "ranks": ranks})

    @torch.no_grad()
    def _apply(self, active: dict[str, torch.Tensor]) -> None:
        for name, layer in self.layers:
            layer.core.values[0].masked_fill_(~active[name], 0.0)

    # -- resume --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "ema_ipt": {n: [t.clone() for t in ts] for n, ts in self.ema_ipt.items()},
            "ema_unc": {n: [t.clone() for t in ts] for n, ts in self.ema_unc.items()},
            "pattern": None if self.pattern is None else {n: m.clone() for n, m in self.pattern.items()},
            "history": [dict(e, ranks=dict(e["ranks"])) for e in self.history],
            "budget": self.budget,
            "threshold": self.threshold,
        }

    def load_state_dict(self, state: dict, model: nn.Module, optimizer=None, scheduler=None) -> None:
        device = {name: layer.core.values[0].device for name, layer in self.layers}
        self.ema_ipt = {n: [t.to(device[n]) for t in ts] for n, ts in state["ema_ipt"].items()}
        self.ema_unc = {n: [t.to(device[n]) for t in ts] for n, ts in state["ema_unc"].items()}
        self.pattern = None if state["pattern"] is None else {n: m.to(device[n]) for n, m in state["pattern"].items()}
        self.history = [dict(e, ranks=dict(e["ranks"])) for e in state["history"]]
        self.budget, self.threshold = state["budget"], state["threshold"]

    # -- accounting ----------------------------------------------------------------------
    def ranks(self, model: nn.Module) -> dict[str, int]:
        """Active rank = number of non-zero singular values."""
        return {name: int((layer.core.vector() != 0).sum()) for name, layer in adapted_layers(model)}

    def adapter_params(self, model: nn.Module) -> int:
        """Effective parameters: each active triplet costs d_in + d_out + 1; masked ones cost nothing."""
        layers = dict(adapted_layers(model))
        return sum(r * (layers[n].in_features + layers[n].out_features + 1) for n, r in self.ranks(model).items())

    def target_rank(self) -> float:
        return self.target_budget / len(self.layers) if self.layers else float(self.settings.target_rank)

    def metrics(self) -> dict[str, float]:
        values = {
            "budget": float(self.budget if self.budget is not None else 0),
            "total_rank": float(sum(int((layer.core.vector() != 0).sum()) for _, layer in self.layers)),
        }
        if self.threshold is not None:
            values["threshold"] = self.threshold
        return values

    def report(self, model: nn.Module) -> dict:
        return super().report(model) | {
            "init_budget": self.init_budget,
            "target_budget": self.target_budget,
            "history": self.history,
        }
