"""IncreLoRA (Zhang et al., 2023; methods.md §3): start every module at rank 1 and grow the
most important ones until the total rank reaches the budget.

    ΔW = α/(r_t + 1e-5) · B · diag(λ) · A          r_t = activated components of the module

Components are blocks of Δr rows appended to the shared :class:`AdaptedLinear`; the last
block of every module is the "advance learning" reserve (§3.2), which is in the product but
not in r_t. The module score (§3.3) is Σ|ΔW ⊙ ∂L/∂ΔW| / √(d_out·d_in), smoothed by two EMAs;
growth (§3.4) runs in ``before_step``, i.e. after backward and before ``optimizer.step``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from triadapt.errors import ConfigError
from triadapt.methods.adapted_linear import AdaptedLinear, optimizer_group
from triadapt.methods.base import Method, resolve_steps
from triadapt.methods.cores import DiagonalCore
from triadapt.methods.fp32_statistics import fp32_statistics
from triadapt.methods.module_discovery import adapted_layers, find_target_linears, replace_module
from triadapt.methods.orthogonal_regulariser import orthogonal_regulariser
from triadapt.schedules import NEW_GROUP_SCHEDULES, add_param_group

#: the reference code's Δr for a given target average rank (its ``rank_dic``)
RANK_STEP = {2: 1, 4: 2, 6: 3, 8: 4}
#: frozen λ of the reserve: small enough to leave the output unchanged, non-zero so that
#: a and b receive gradients and Adam can learn their direction in advance
RESERVE_LAMBDA = 1e-5
INIT_STD = 0.02


class IncreLoRA(Method):
    name = "increlora"

    def __init__(self, cfg, ctx) -> None:
        super().__init__(cfg, ctx)
        total_steps = ctx.total_steps
        self.target_avg = int(cfg.target_rank)
        self.target_total = None if cfg.get("target_total_rank") is None else int(cfg.target_total_rank)
        if (self.target_total if self.target_total is not None else self.target_avg) <= 0:
            raise ConfigError(
                f"IncreLoRA target rank must be > 0 (method.target_rank={cfg.target_rank}, "
                f"method.target_total_rank={cfg.get('target_total_rank')})"
            )
        self.init_rank = int(cfg.init_rank)
        if self.init_rank <= 0:
            raise ConfigError(f"method.init_rank={cfg.init_rank} must be a positive integer")
        step = cfg.get("incre_rank_num")
        self.delta_r = int(step) if step is not None else RANK_STEP.get(self.target_avg, max(1, self.target_avg // 2))
        if self.delta_r <= 0:
            raise ConfigError(f"method.incre_rank_num={step} must be a positive integer")
        interval = cfg.incre_interval
        if interval is None or isinstance(interval, bool) or interval <= 0:
            raise ConfigError(f"method.incre_interval={interval} must be > 0 (steps or a fraction of the run)")
        # A positive fraction of a very short run still means "every step", not "never".
        self.interval = max(1, resolve_steps(interval, total_steps, "method.incre_interval"))
        self.init_warmup = resolve_steps(cfg.init_warmup, total_steps, "method.init_warmup") or 0
        self.top_h = None if cfg.get("top_h") is None else int(cfg.top_h)
        if self.top_h is not None and self.top_h <= 0:
            raise ConfigError(f"method.top_h={cfg.top_h} must be a positive integer (or null for automatic)")
        self.beta1, self.beta2 = float(cfg.beta1), float(cfg.beta2)
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ConfigError(f"method.beta1={cfg.beta1} and method.beta2={cfg.beta2} must lie in (0, 1)")
        self.alpha = float(cfg.alpha)
        self.orth_reg_weight = float(cfg.orth_reg_weight)
        self.advance_learn = bool(cfg.advance_learn)
        self.new_group_schedule = str(cfg.new_group_schedule)
        if self.new_group_schedule not in NEW_GROUP_SCHEDULES:
            choices = ", ".join(NEW_GROUP_SCHEDULES)
            raise ConfigError(f"method.new_group_schedule={cfg.new_group_schedule!r}; choose one of {choices}")
        self.overshoot = str(cfg.overshoot)
        if self.overshoot not in ("clamp", "allow"):
            raise ConfigError(f"method.overshoot={cfg.overshoot!r}; choose clamp or allow")

        self.n = 0  # adapted modules, known at inject
        # Own generator: the init of grown components neither depends on nor disturbs the
        # global RNG (dropout, data), so a resumed run draws exactly what the uninterrupted one drew.
        self.generator = torch.Generator().manual_seed(ctx.seed)
        self._handles: list = []
        self._inputs: dict[str, torch.Tensor] = {}  # dropout(x) of the current forward, until its output is hooked

        # Allocator state, saved by state_dict.
        self.ranknum: dict[str, int] = {}  # activated rank per module, in module order
        self.total = 0
        self.reserve_added = False
        self.finished = False
        self.history: list[dict] = []
        self.raw: dict[str, torch.Tensor] = {}  # latest s_k per module, written by the gradient hook
        self.ema_ipt: torch.Tensor | None = None  # Ī
        self.ema_unc: torch.Tensor | None = None  # Ū

    # -- structure -----------------------------------------------------------------------
    def _scale(self, rank: int) -> float:
        return self.alpha / (rank + 1e-5)

    def _append(
        self, layer: AdaptedLinear, k: int, lam: float, trainable_ab: bool, trainable_lam: bool
    ) -> list[nn.Parameter]:
        a = torch.randn(k, layer.in_features, generator=self.generator) * INIT_STD
        b = torch.randn(layer.out_features, k, generator=self.generator) * INIT_STD
        ab = layer.append_factors(a, b, trainable=trainable_ab)
        lam_p = layer.core.append(torch.full((k,), lam, device=layer.base.weight.device), trainable=trainable_lam)
        return ab + [lam_p]

    def _new_reserve(self, layer: AdaptedLinear) -> list[nn.Parameter]:
        """Append Δr reserve components: a, b train in advance (λ frozen at 1e-5), or stay frozen at λ=0."""
        lam = RESERVE_LAMBDA if self.advance_learn else 0.0
        return self._append(layer, self.delta_r, lam, trainable_ab=self.advance_learn, trainable_lam=False)

    def _add_group(self, optimizer, scheduler, params: list[nn.Parameter]) -> None:
        if optimizer is not None:  # None when only loading an adapter for inference
            add_param_group(optimizer, scheduler, params, self.ctx.weight_decay, self.new_group_schedule)

    def inject(self, model: nn.Module) -> list[dict]:
        for p in model.parameters():
            p.requires_grad_(False)
        params = []
        widest = 0  # the largest min(d_in, d_out): a module may grow past its own, not the average past all
        for name, linear in find_target_linears(model, self.ctx.target_modules):
            widest = max(widest, min(linear.in_features, linear.out_features))
            scale = self._scale(self.init_rank)
            layer = AdaptedLinear(linear, DiagonalCore(), dropout=float(self.cfg.dropout), scale=scale)
            # λ = 0 and a, b ~ N(0, 0.02²): ΔW = 0 at step 0, yet every factor gets a gradient.
            params += self._append(layer, self.init_rank, 0.0, trainable_ab=True, trainable_lam=True)
            replace_module(model, name, layer)
            self.ranknum[name] = self.init_rank
        self.n = len(self.ranknum)
        self.total = self.n * self.init_rank
        if self.target_total is None:
            self.target_total = self.target_avg * self.n
        if self.target_total > widest * self.n:
            raise ConfigError(
                f"IncreLoRA target total rank {self.target_total} (method.target_rank={self.cfg.target_rank}, "
                f"method.target_total_rank={self.cfg.get('target_total_rank')}) is too large: its average over the "
                f"{self.n} adapted matrices exceeds min(d_in, d_out) = {widest} of every one"
            )
        self._check_schedule()
        if self.total < self.target_total:
            self._attach_hooks(model)
        return [optimizer_group(params, self.ctx.weight_decay)]

    def _check_schedule(self) -> None:
        """Fail before training when the growth schedule cannot reach the target in time."""
        needed = self.target_total - self.total
        if needed < 0:
            raise ConfigError(
                f"IncreLoRA target total rank {self.target_total} is below the initial total {self.total} "
                f"({self.n} modules × init_rank {self.init_rank})"
            )
        if self.overshoot == "clamp" and needed % self.delta_r:
            raise ConfigError(
                f"IncreLoRA needs {needed} more ranks, not a multiple of incre_rank_num={self.delta_r}; "
                "change target_total_rank or use overshoot=allow"
            )
        T, w, dt = self.ctx.total_steps, self.init_warmup, self.interval
        # Growth events are the steps t in (init_warmup, T-1] with t % interval == 0.
        events = max(0, (T - 1) // dt - w // dt)
        grows = math.ceil(needed / self.delta_r)
        if self.top_h is None:  # the fewest modules per event that reach the target within the run
            self.top_h = max(1, math.ceil(grows / events)) if events else 1
        rounds = math.ceil(grows / min(self.top_h, self.n))
        if rounds > events:
            raise ConfigError(
                f"IncreLoRA growth needs {rounds} events of top_h={self.top_h} × incre_rank_num={self.delta_r} every "
                f"{dt} steps after init_warmup={w}, but only {events} fit in {T} steps; "
                "raise top_h or the steps, or lower the target"
            )

    # -- importance (§3.3) ---------------------------------------------------------------
    def _attach_hooks(self, model: nn.Module) -> None:
        # ΔW is never materialised in the forward, so G = ∂L/∂ΔW = Σ_tokens grad_y ⊗ dropout(x)
        # is rebuilt from the layer's dropped-out input and the gradient of its output.
        for name, layer in adapted_layers(model):
            self._handles.append(layer.dropout.register_forward_hook(partial(self._keep_input, name)))
            self._handles.append(layer.register_forward_hook(partial(self._watch_output, name)))

    def _keep_input(self, name, module, args, output) -> None:
        self._inputs[name] = output

    def _watch_output(self, name, layer, args, output) -> None:
        x = self._inputs.pop(name, None)
        if x is not None and output.requires_grad:  # evaluation passes are not scored
            output.register_hook(partial(self._score, name, layer, x))

    def _score(self, name: str, layer: AdaptedLinear, x: torch.Tensor, grad: torch.Tensor) -> None:
        with torch.no_grad(), fp32_statistics():
            g = grad.reshape(-1, grad.shape[-1]).float()
            G = g.T @ x.reshape(-1, x.shape[-1]).float()
            dw = layer.delta_weight().float()  # includes the scale and the reserve, as in the reference code
            # in place on the fresh d_out×d_in product: no second and third weight-sized temporary
            self.raw[name] = G.mul_(dw).abs_().sum() / math.sqrt(dw.numel())

    def _update_ema(self) -> None:
        ref = next(iter(self.raw.values()), None)
        zero = torch.zeros((), device=ref.device if ref is not None else "cpu")
        # A module that saw no backward since the last step keeps its last score.
        s = torch.stack([self.raw.get(name, zero) for name in self.ranknum])
        ipt = torch.zeros_like(s) if self.ema_ipt is None else self.ema_ipt.to(s.device)
        unc = torch.zeros_like(s) if self.ema_unc is None else self.ema_unc.to(s.device)
        self.ema_ipt = self.beta1 * ipt + (1 - self.beta1) * s
        self.ema_unc = self.beta2 * unc + (1 - self.beta2) * (s - self.ema_ipt).abs()

    def scores(self) -> dict[str, float]:
        """score_k = Ī_k · Ū_k."""
        if self.ema_ipt is None:
            return {name: 0.0 for name in self.ranknum}
        return dict(zip(self.ranknum, (self.ema_ipt * self.ema_unc).tolist()))

    # -- growth (§3.4) -------------------------------------------------------------------
    def capture_mode(self, step: int) -> str:
        # Until the budget is met, forward and backward hooks score every module at every step.
        return "graph" if self.reserve_added and self.finished else "eager"

    def before_step(self, step: int, model: nn.Module, optimizer, scheduler) -> None:
        if not self.reserve_added:
            self._add_reserve(model, optimizer, scheduler)
        if self.total < self.target_total:
            self._update_ema()
            if step > self.init_warmup and step % self.interval == 0:
                self._grow(step, model, optimizer, scheduler)
        if self.total >= self.target_total and not self.finished:
            self._finish(model)

    def _add_reserve(self, model: nn.Module, optimizer, scheduler) -> None:
        params = []
        for _, layer in adapted_layers(model):
            params += self._new_reserve(layer)
        self._add_group(optimizer, scheduler, params)
        self.reserve_added = True

    def _grow(self, step: int, model: nn.Module, optimizer, scheduler) -> None:
        scores = self.scores()
        names = list(scores)
        remaining = self.target_total - self.total
        # The reference code compares a module count with a rank count (k = min(top_h, R*−total));
        # clamp counts whole Δr blocks instead so that the total lands exactly on R*.
        fit = remaining if self.overshoot == "allow" else remaining // self.delta_r
        k = min(self.top_h, fit, len(names))
        threshold = sorted(scores.values(), reverse=True)[k - 1]
        selected = [n for n in names if scores[n] >= threshold]  # ties at τ may exceed k
        if self.overshoot == "clamp" and len(selected) > fit:
            order = {n: i for i, n in enumerate(names)}
            keep = set(sorted(selected, key=lambda n: (-scores[n], order[n]))[:fit])
            selected = [n for n in selected if n in keep]
        self._activate(model, selected, optimizer, scheduler)
        self.history.append({"step": step, "selected": selected, "threshold": threshold, "total_rank": self.total})

    def _activate(self, model: nn.Module, selected: list[str], optimizer, scheduler) -> None:
        """Turn the reserve of each selected module into active rank and give it a fresh reserve."""
        layers = dict(adapted_layers(model))
        params = []
        for name in selected:
            layer = layers[name]
            lam = layer.core.values[-1]
            lam.requires_grad_(True)
            params.append(lam)
            if not self.advance_learn:  # a, b were frozen while in reserve
                for p in (layer.lora_A[-1], layer.lora_B[-1]):
                    p.requires_grad_(True)
                    params.append(p)
            self.ranknum[name] += self.delta_r
            self.total += self.delta_r
            layer.scale = self._scale(self.ranknum[name])
            params += self._new_reserve(layer)  # add_param_group keeps only the trainable ones
        # One new param group per event: fresh Adam state and its own (restarted) LR schedule.
        self._add_group(optimizer, scheduler, params)

    def _finish(self, model: nn.Module) -> None:
        """Budget met: stop scoring; zero the reserve λ so the reserve no longer contributes."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._inputs.clear()
        # The reference code disables the reserve only when the total hits R* exactly; an
        # overshooting run (overshoot=allow) keeps it, as there.
        if self.total == self.target_total:
            with torch.no_grad():
                for _, layer in adapted_layers(model):
                    layer.core.values[-1].zero_()
        self.finished = True

    # -- loss and logging ----------------------------------------------------------------
    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.orth_reg_weight == 0:
            return None
        # Over the concatenated A, B of each module, reserve included (§3.6).
        return self.orth_reg_weight * orthogonal_regulariser(layer for _, layer in adapted_layers(model))

    def metrics(self) -> dict[str, float]:
        return {"total_rank": float(self.total)}

    # -- resume --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        def cpu(t):
            return None if t is None else t.detach().cpu().clone()

        return {
            "ranknum": dict(self.ranknum),
            "total": self.total,
            "reserve_added": self.reserve_added,
            "finished": self.finished,
            "history": [dict(e, selected=list(e["selected"])) for e in self.history],
            "raw": {n: cpu(t) for n, t in self.raw.items()},
            "ema_ipt": cpu(self.ema_ipt),
            "ema_unc": cpu(self.ema_unc),
        }

    def load_state_dict(self, state: dict, model: nn.Module, optimizer=None, scheduler=None) -> None:
        # Replay the growth on the freshly injected model: the same Parameters and param
        # groups in the same order; their values and optimizer/scheduler states are loaded
        # by the caller afterwards. The replay draws what the run drew, in the same order, so
        # the seeded generator ends where the run's was.
        if state["reserve_added"]:
            self._add_reserve(model, optimizer, scheduler)
        for event in state["history"]:
            self._activate(model, event["selected"], optimizer, scheduler)
        if state["finished"]:
            self._finish(model)
        if self.ranknum != state["ranknum"] or self.total != state["total"]:
            raise ConfigError("IncreLoRA checkpoint does not fit this model (replayed ranks differ)")
        self.history = [dict(e, selected=list(e["selected"])) for e in state["history"]]
        self.raw = dict(state["raw"])
        self.ema_ipt, self.ema_unc = state["ema_ipt"], state["ema_unc"]

    # -- accounting ----------------------------------------------------------------------
    def target_rank(self) -> float:
        return self.target_total / self.n if self.n else float(self.target_avg)

    def ranks(self, model: nn.Module) -> dict[str, int]:
        return dict(self.ranknum)

    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The activated components only, Σ r_k·(d_in + d_out + 1) values: the reserve is outside the budget."""
        state = super().adapter_state(model)
        if not self.reserve_added:
            return state
        reserve = set()
        for name, layer in adapted_layers(model):
            i = len(layer.lora_A) - 1
            reserve |= {f"{name}.lora_A.{i}", f"{name}.lora_B.{i}", f"{name}.core.values.{i}"}
        return {k: v for k, v in state.items() if k not in reserve}

    def report(self, model: nn.Module) -> dict:
        return super().report(model) | {
            "history": self.history,
            "target_total_rank": self.target_total,
            "total_rank": self.total,
            "overshoot": max(0, self.total - self.target_total),
            "top_h": self.top_h,
            "incre_rank_num": self.delta_r,
            "init_warmup": self.init_warmup,
            "incre_interval": self.interval,
        }
