"""TriAdaptLoRA (Liang, Wang, Zeng, arXiv 2501.08008), as specified in methods.md §4.

Every target ``nn.Linear`` gets ΔW = s · B · C · A with a triangular core C = L + U
(:class:`TriangularCore`; ``core: diagonal`` swaps in :class:`DiagonalCore` as an ablation).
Ranks start at ``init_rank`` and grow during training:

* §4.2 score — S_k = ‖C_k‖_F / n_k − P_k, then P_k ← ‖C_k‖_F / n_k, with n_k the number of
  appended components (blocks); evaluated only at allocation events.
* §4.3 dynamic threshold — at step t > t0 with t % Δt == 0 and R_t < R*:
  p = (t − t0)/(T − t0); m = ⌊(R* − R_t)·p⌋ (linear) or int(exp(p·ln(R* − R_t))) (exponential), clamped
  to [1, n]; τ = m-th largest score; every module with S ≥ τ grows by Δr.
* §4.4 growth appends one block of A, B and core per grown module (existing tensors and their
  Adam state are untouched) and puts them in a new optimizer param group with its own LR schedule.
* §4.5 loss += γ · mean over modules of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F (nothing on C).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from triadapt.errors import ConfigError
from triadapt.methods.adapted_linear import AdaptedLinear, optimizer_group
from triadapt.methods.base import Method, resolve_steps
from triadapt.methods.cores import DiagonalCore, TriangularCore
from triadapt.methods.fp32_statistics import at_least_fp32, fp32_statistics
from triadapt.methods.module_discovery import adapted_layers, find_target_linears, replace_module
from triadapt.methods.orthogonal_regulariser import orthogonal_regulariser
from triadapt.schedules import NEW_GROUP_SCHEDULES, add_param_group

GROWTHS = ("linear", "exponential", "none")
SCORES = ("frobenius", "random")
CORES = ("triangular", "diagonal")
INITS = ("single", "block_c0")
SCALINGS = ("alpha_over_r", "constant")
OVERSHOOTS = ("clamp", "allow")
INIT_STD = 0.02
#: checkpoint layout: one A, B and core block per module and growth event
LAYOUT = "event_blocks"


def growth_count(remaining: int, progress: float, n_modules: int, growth: str) -> int:
    """m_t of §4.3: how many modules the threshold admits at this event."""
    if growth == "linear":
        m = math.floor(remaining * progress)
    else:  # as the author computes it: int(exp(p·ln rem)), which differs from ⌊rem^p⌋ at float edges
        m = int(math.exp(progress * math.log(remaining)))
    return min(max(m, 1), n_modules)


def threshold_candidates(scores: dict[str, float], m: int) -> tuple[float, list[str]]:
    """τ = m-th largest score and the modules with S ≥ τ, best first (ties broken by name)."""
    order = sorted(scores, key=lambda name: (-scores[name], name))
    tau = scores[order[m - 1]]
    return tau, [name for name in order if scores[name] >= tau]


def _choice(cfg, key: str, options: tuple[str, ...]) -> str:
    value = str(cfg[key])
    if value not in options:
        raise ConfigError(f"method.{key}={value!r}; choose one of {', '.join(options)}")
    return value


class TriAdaptLoRA(Method):
    name = "triadapt"

    def __init__(self, cfg, ctx) -> None:
        super().__init__(cfg, ctx)
        self.growth = _choice(cfg, "growth", GROWTHS)
        self.score = _choice(cfg, "score", SCORES)
        self.core = _choice(cfg, "core", CORES)
        self.init = _choice(cfg, "init", INITS)
        self.scaling = _choice(cfg, "scaling", SCALINGS)
        self.overshoot = _choice(cfg, "overshoot", OVERSHOOTS)
        self.new_group_schedule = _choice(cfg, "new_group_schedule", NEW_GROUP_SCHEDULES)

        self.rank = int(cfg.target_rank)
        self.init_rank = int(cfg.init_rank)
        # Code default Δr = r̄/2 (its rank_dic), at least 1.
        self.delta_r = int(cfg.incre_rank_num) if cfg.incre_rank_num is not None else max(1, self.rank // 2)
        self.init_warmup = resolve_steps(cfg.init_warmup, ctx.total_steps, "method.init_warmup") or 0
        self.incre_interval = resolve_steps(cfg.incre_interval, ctx.total_steps, "method.incre_interval")
        if isinstance(cfg.incre_interval, float) and cfg.incre_interval > 0:
            self.incre_interval = max(1, self.incre_interval)  # a fraction of a short run still means every step
        self.alpha = float(cfg.alpha)
        self.scale_constant = float(cfg.scale_constant)
        self.weight_decay = ctx.weight_decay if cfg.weight_decay is None else float(cfg.weight_decay)
        self.orth_reg_weight = float(cfg.orth_reg_weight)
        if self.rank <= 0:
            raise ConfigError(f"method.target_rank={self.rank} must be a positive integer")
        if cfg.target_total_rank is not None and int(cfg.target_total_rank) <= 0:
            raise ConfigError(f"method.target_total_rank={cfg.target_total_rank} must be a positive integer")
        if not 0 < self.init_rank <= self.rank:
            raise ConfigError(f"method.init_rank={self.init_rank} must lie in [1, target_rank={self.rank}]")
        if self.delta_r <= 0:
            raise ConfigError(f"method.incre_rank_num={self.delta_r} must be a positive integer")
        if not self.incre_interval:
            raise ConfigError(
                f"method.incre_interval={cfg.incre_interval} resolves to {self.incre_interval} steps; need >= 1"
            )

        self.layers: dict[str, AdaptedLinear] = {}
        self.prev_norm: dict[str, float] = {}  # P_k
        self.total_rank = 0  # R_t
        self.target_total = 0  # R*
        self.history: list[dict] = []
        self.withheld = 0  # ranks the threshold admitted but overshoot=clamp did not grant
        self.last_threshold: float | None = None
        # Private generators: growth and random selection do not depend on (or disturb) the
        # loop's RNG stream, and their states are saved for an exact resume.
        self.init_gen = torch.Generator().manual_seed(ctx.seed)
        self.select_gen = torch.Generator().manual_seed(ctx.seed)

    # -- parametrisation (§4.1) ------------------------------------------------------------
    def _normal(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.init_gen).mul_(INIT_STD)

    def _append(self, layer: AdaptedLinear, k: int, initial: bool) -> list[nn.Parameter]:
        """Append k ranks to ``layer`` as one block of A, B and core; return the new Parameters.

        single: k components of size 1; ℓ, u, a, b ~ N(0, 0.02²), except b = 0 for a module's
        very first component (so ΔW = 0 at start when init_rank = 1; with init_rank > 1 the other
        initial components start non-zero, as in the author's code, whose reset re-initialises
        index 0 only). They are drawn component by component in the author's order (a, b, ℓ, u),
        then stored together: the triangle entries of the new rows of L and columns of U, nothing
        else. block_c0: one block of size k with its core entries 0 and A, B ~ N(0, 0.02²).
        """
        device = layer.base.weight.device
        d_in, d_out, r0 = layer.in_features, layer.out_features, layer.rank
        triangular = self.core == "triangular"
        if self.init == "single":
            a, b, lower, upper = [], [], [], []
            for i in range(r0, r0 + k):
                a.append(self._normal(1, d_in))
                b.append(torch.zeros(d_out, 1) if initial and i == 0 else self._normal(d_out, 1))
                lower.append(self._normal(i + 1 if triangular else 1))  # row i of L: entries 0..i
                if triangular:
                    upper.append(self._normal(i + 1))  # column i of U: entries 0..i
            a, b, core = torch.cat(a), torch.cat(b, dim=1), torch.cat(lower + upper)
        else:
            a, b = self._normal(k, d_in), self._normal(d_out, k)
            core = torch.zeros(TriangularCore.block_numel(r0, r0 + k, False) if triangular else k)
        new = layer.append_factors(a, b)
        if triangular:
            new.append(layer.core.append(core.to(device), k, triangular=self.init == "single"))
        else:
            new.append(layer.core.append(core.to(device), components=k if self.init == "single" else 1))
        # s = α/r_k with the code's +1e-5; it shrinks as the module grows.
        r1 = r0 + k
        layer.scale = self.alpha / (r1 + 1e-5) if self.scaling == "alpha_over_r" else self.scale_constant
        return new

    def _new_core(self) -> nn.Module:
        return TriangularCore() if self.core == "triangular" else DiagonalCore()

    def inject(self, model: nn.Module) -> list[dict]:
        for p in model.parameters():
            p.requires_grad_(False)
        targets = find_target_linears(model, self.ctx.target_modules)
        n = len(targets)
        for name, linear in targets:
            if self.rank > min(linear.in_features, linear.out_features):
                raise ConfigError(f"method.target_rank={self.rank} exceeds min(d_in, d_out) of {name}")
        self.target_total = int(self.cfg.target_total_rank or self.rank * n)
        start = self.rank if self.growth == "none" else self.init_rank
        if self.growth == "none" and self.target_total != self.rank * n:
            raise ConfigError(
                f"method.growth=none trains a uniform rank {self.rank}: "
                f"target_total_rank must be {self.rank * n} or null"
            )
        if start * n > self.target_total:
            raise ConfigError(f"initial total rank {start * n} exceeds target_total_rank={self.target_total}")

        params = []
        for name, linear in targets:
            layer = AdaptedLinear(linear, self._new_core(), dropout=float(self.cfg.dropout))
            params += self._append(layer, start, initial=True)
            replace_module(model, name, layer)
            self.layers[name] = layer
        self.total_rank = start * n
        self.prev_norm = {name: self._core_norm(layer) for name, layer in self.layers.items()}
        if self.growth != "none":
            self._check_reachable()
        return [optimizer_group(params, self.ctx.weight_decay)]

    # -- validation ------------------------------------------------------------------------
    def _event_steps(self) -> range:
        first = (self.init_warmup // self.incre_interval + 1) * self.incre_interval
        return range(first, self.ctx.total_steps, self.incre_interval)

    def _check_reachable(self) -> None:
        n, needed = len(self.layers), self.target_total - self.total_rank
        events = len(self._event_steps())
        if events * n * self.delta_r < needed:
            raise ConfigError(
                f"TriAdaptLoRA cannot reach target_total_rank={self.target_total}: {events} growth events after "
                f"init_warmup={self.init_warmup} every {self.incre_interval} steps, even growing all {n} modules "
                f"by {self.delta_r}, add at most {events * n * self.delta_r} < {needed}; lower method.init_warmup or "
                "method.incre_interval, raise method.incre_rank_num, or train for more steps"
            )
        # The m_t rule is deterministic in (R_t, p); ties only add modules, so this is exact
        # without ties and a lower bound otherwise.
        total = self.total_rank
        for step in self._event_steps():
            if total >= self.target_total:
                break
            remaining = self.target_total - total
            total += min(growth_count(remaining, self._progress(step), n, self.growth) * self.delta_r, remaining)
        if total < self.target_total:
            warnings.warn(
                f"TriAdaptLoRA's {self.growth} rule reaches total rank {total} of {self.target_total} by step "
                f"{self.ctx.total_steps} (barring ties); lower init_warmup/incre_interval or raise incre_rank_num",
                stacklevel=2,
            )

    # -- score (§4.2) ------------------------------------------------------------------------
    @torch.no_grad()
    def _core_norm(self, layer: AdaptedLinear) -> float:
        core = layer.core
        with fp32_statistics():
            c = at_least_fp32(core.vector() if isinstance(core, DiagonalCore) else core.matrix())
            return (torch.linalg.vector_norm(c) / core.n_components).item()

    def _scores(self) -> dict[str, float]:
        scores = {}
        for name, layer in self.layers.items():
            norm = self._core_norm(layer)
            scores[name] = norm - self.prev_norm[name]
            self.prev_norm[name] = norm
        return scores

    # -- dynamic-threshold growth (§4.3) --------------------------------------------------------
    def _progress(self, step: int) -> float:
        return (step - self.init_warmup) / (self.ctx.total_steps - self.init_warmup)

    def _grows_at(self, step: int) -> bool:
        if self.growth == "none" or self.total_rank >= self.target_total:
            return False
        return step > self.init_warmup and not step % self.incre_interval

    def capture_mode(self, step: int) -> str:
        # Between growth events the hooks do nothing; a growth event scores modules on the host.
        return "split" if self._grows_at(step) else "graph"

    def before_step(self, step: int, model: nn.Module, optimizer, scheduler) -> None:
        if not self._grows_at(step):
            return
        progress = self._progress(step)
        m = growth_count(self.target_total - self.total_rank, progress, len(self.layers), self.growth)
        if self.score == "frobenius":
            tau, candidates = threshold_candidates(self._scores(), m)
        else:  # ablation: same m, modules drawn uniformly at random
            names = list(self.layers)
            picks = torch.randperm(len(names), generator=self.select_gen)[:m].tolist()
            tau, candidates = None, [names[i] for i in picks]
        before = self.total_rank
        selected = self._grow(candidates, optimizer, scheduler)
        self.withheld += len(candidates) * self.delta_r - (self.total_rank - before)
        self.last_threshold = tau
        self.history.append(
            {"step": step, "progress": progress, "m": m, "threshold": tau, "selected": selected,
             "total_rank": self.total_rank}
        )

    def _grow(self, candidates: list[str], optimizer, scheduler) -> list[str]:
        """Grow ``candidates`` in order; with overshoot=clamp stop exactly at R* (the last module
        may get fewer than Δr ranks). Returns the modules that grew."""
        new, grown = [], []
        for name in candidates:
            k = self.delta_r
            if self.overshoot == "clamp":
                k = min(k, self.target_total - self.total_rank)
                if k <= 0:
                    break
            new += self._append(self.layers[name], k, initial=False)
            self.total_rank += k
            grown.append(name)
        add_param_group(optimizer, scheduler, new, self.weight_decay, self.new_group_schedule)
        return grown

    # -- regulariser (§4.5) ----------------------------------------------------------------------
    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.orth_reg_weight == 0:
            return None
        return self.orth_reg_weight * orthogonal_regulariser(self.layers.values())

    # -- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "layout": LAYOUT,
            "history": [dict(e, selected=list(e["selected"])) for e in self.history],
            "prev_norm": dict(self.prev_norm),
            "withheld": self.withheld,
            "last_threshold": self.last_threshold,
            "init_gen": self.init_gen.get_state(),
            "select_gen": self.select_gen.get_state(),
        }

    def load_state_dict(self, state: dict, model: nn.Module, optimizer=None, scheduler=None) -> None:
        if state.get("layout") != LAYOUT:
            raise ConfigError(
                "this TriAdaptLoRA checkpoint stores one tensor per rank (the layout before one block per growth "
                "event) and cannot be resumed by this version; resume it with the commit that wrote it, or start over"
            )
        # Replay every event on the freshly injected model so that parameters and param groups
        # exist in the original order; their values are loaded afterwards by the caller.
        for event in state["history"]:
            self._grow(event["selected"], optimizer, scheduler)
            if self.total_rank != event["total_rank"]:
                raise RuntimeError(
                    f"resume replay reached total rank {self.total_rank}, the checkpoint had {event['total_rank']}"
                )
        self.history = [dict(e, selected=list(e["selected"])) for e in state["history"]]
        self.prev_norm = dict(state["prev_norm"])
        self.withheld = state["withheld"]
        self.last_threshold = state["last_threshold"]
        self.init_gen.set_state(state["init_gen"].cpu())  # CPU generators; checkpoints load onto the device
        self.select_gen.set_state(state["select_gen"].cpu())

    # -- accounting --------------------------------------------------------------------------------
    def adapter_params(self, model: nn.Module) -> int:
        # Σ r_k (d_in + d_out) plus the core: r(r+1) per module for the single triangular core.
        return sum(
            layer.rank * (layer.in_features + layer.out_features) + layer.core.num_parameters()
            for _, layer in adapted_layers(model)
        )

    def target_rank(self) -> float:
        return self.target_total / len(self.layers) if self.layers else float(self.rank)

    def metrics(self) -> dict[str, float]:
        return {
            "total_rank": float(self.total_rank),
            "threshold": math.nan if self.last_threshold is None else float(self.last_threshold),
        }

    def report(self, model: nn.Module) -> dict:
        out = super().report(model)
        out.update(
            target_total_rank=self.target_total,
            total_rank=self.total_rank,
            history=self.history,
            overshoot={
                "mode": self.overshoot,
                "excess": max(0, self.total_rank - self.target_total),
                "withheld": self.withheld,
            },
        )
        return out
