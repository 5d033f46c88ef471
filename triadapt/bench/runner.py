"""One timed variant (:class:`Runner`: model, method, optimizer in a given phase), the interleaved
rounds that time several side by side, their paired ratios, and the per-step counts."""

from __future__ import annotations

import copy
import gc
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from triadapt.bench.config import method_config, train_config
from triadapt.bench.machine import sync
from triadapt.train import build_optimizer, clip_gradients, optimizer_step


@dataclass
class Spec:
    """One timed variant: a method, a phase and its settings."""

    method: str
    phase: str = "steady"  # steady (final rank) | growth (allocation phase)
    rank: int = 8
    overrides: dict = field(default_factory=dict)
    label: str | None = None
    capture: bool = False  # whole-step CUDA graphs (train.cuda_graphs), keyed "<variant>+graph"

    @property
    def key(self) -> str:
        key = self.label or (self.method if self.phase == "steady" else f"{self.method}:{self.phase}")
        return f"{key}+graph" if self.capture else key


class Runner:
    """A model + method + optimizer in a given state; ``step()`` runs one timed training step."""

    def __init__(self, spec: Spec, base: nn.Module, model_cfg: DictConfig, batch: dict, device: torch.device,
                 run_steps: int, warmup: int, seed: int, autocast: bool = False) -> None:
        from triadapt.experiment import inject_with_head
        from triadapt.methods import RunContext, build_method
        from triadapt.schedules import GroupedLinearSchedule

        self.spec, self.batch, self.device = spec, batch, device
        self.autocast = autocast  # bf16 autocast around forward and loss, as the training loop does on CUDA
        self.key = spec.key
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.hooks: list[float] = []
        self.score_s = 0.0
        self.method = None
        self.optimizer = self.scheduler = None
        self.nodes = self.tensors = None  # per step, set by a counting step (count_per_step)
        self.step_no = 0
        self.prep_steps = 0
        self.stepper = None  # captured steps (spec.capture)
        self.floor_graph, self.floor_warm = None, 0
        torch.manual_seed(seed)
        model = copy.deepcopy(base)
        model.train()
        tcfg = train_config()
        self.clip = float(tcfg.max_grad_norm or 0)
        if spec.method == "floor":
            for p in model.parameters():
                p.requires_grad_(False)
            # The output of every module an adapter would adapt requires grad; the first ones (layer 0's
            # query/key/value, whose input needs no gradient) become leaves of the graph. Backward then
            # produces ∂L/∂(output) of every adapted module, what any adapter method needs, and nothing
            # more: no weight gradient, no ∂x below the first adapted modules, no optimizer.
            self.floor_leaves: list[torch.Tensor] = []

            def mark(module, args, output):
                if not output.requires_grad:
                    output.requires_grad_(True)
                    self.floor_leaves.append(output)
                return output

            from triadapt.methods.core import find_target_linears

            for _, linear in find_target_linears(model, list(model_cfg.target_modules)):
                linear.register_forward_hook(mark)
            self.model = model.to(device)
            self.prep_steps = 3 if spec.capture else 0  # two warm-up steps and the capture, untimed
            return
        ctx = RunContext(
            total_steps=run_steps,
            target_modules=list(model_cfg.target_modules),
            learning_rate=float(tcfg.lr),
            weight_decay=float(tcfg.weight_decay),
            warmup_steps=math.ceil(float(tcfg.warmup_ratio) * run_steps),
            seed=seed,
        )
        cfg = method_config(spec.method, spec.rank, **spec.overrides) if spec.method != "full" else OmegaConf.create(
            {"name": "full"}
        )
        method = build_method(cfg, ctx)
        groups, _ = inject_with_head(method, model, list(model_cfg.head_modules), ctx.weight_decay)
        self.model = model.to(device)
        self.optimizer = build_optimizer(groups, ctx.learning_rate, tcfg.adam_betas, float(tcfg.adam_eps),
                                         fused=bool(tcfg.fused_optimizer))
        self.scheduler = GroupedLinearSchedule(self.optimizer, ctx.warmup_steps, run_steps)
        self.method = method
        if hasattr(method, "_score"):  # IncreLoRA scores modules in gradient hooks during backward
            inner = method._score

            def timed_score(*args, _inner=inner):
                t0 = time.perf_counter()
                try:
                    return _inner(*args)
                finally:
                    self.score_s += time.perf_counter() - t0

            method._score = timed_score
        self._position(run_steps, warmup)
        if spec.capture:
            from triadapt.step_capture import WARMUP_STEPS, CapturedSteps

            self.stepper = CapturedSteps(model=self.model, method=method, optimizer=self.optimizer,
                                         scheduler=self.scheduler, clip=self.clip, autocast=autocast,
                                         device=device, start_step=self.step_no)
            self.prep_steps += WARMUP_STEPS + 1  # eager warm-up and the capture happen before timing

    # -- phases ---------------------------------------------------------------------------------------
    def _position(self, run_steps: int, warmup: int) -> None:
        """Bring the method to the state its phase times: set the step counter, replay growth."""
        name, phase, m = self.spec.method, self.spec.phase, self.method
        if name in ("adalora", "peft_adalora"):
            final_start = m.schedule.final_start
            if phase == "steady":
                # final phase: two untimed steps (importance, then the final mask), then the pattern each step
                self.step_no, self.prep_steps = max(0, final_start - 1), 2
            else:
                self.step_no = m.schedule.tinit + 1  # budgeting: importance every step, masks every ΔT
        elif name == "increlora":
            first = next(t for t in range(m.init_warmup + 1, run_steps) if t % m.interval == 0)
            if phase == "steady":
                self.step_no = replay_increlora(m, self.model, self.optimizer, self.scheduler, run_steps) + 1
            else:  # the first timed step is the first growth event (warm-up steps score and add the reserve)
                self.step_no = max(m.init_warmup + 1, first - warmup)
        elif name == "triadapt" and m.growth != "none":
            events = list(m._event_steps())
            if phase == "steady":
                self.step_no = replay_triadapt(m, self.optimizer, self.scheduler) + 1
            elif events:
                self.step_no = max(0, events[0] - warmup)

    def prepare(self) -> None:
        for _ in range(self.prep_steps):
            self.step()
        self.prep_steps = 0

    # -- one step ---------------------------------------------------------------------------------------
    def step(self, count: bool = False) -> tuple[float, float]:
        """One training step; ``count`` also records its autograd nodes and gradient tensors (untimed use)."""
        model, method, opt, sched = self.model, self.method, self.optimizer, self.scheduler
        sync(self.device)
        self.score_s = 0.0
        if self.spec.method == "floor":
            self.floor_leaves.clear()
        c0 = time.process_time()
        t0 = time.perf_counter()
        if self.spec.capture:
            hook = self._captured_step()
            sync(self.device)
            dt = time.perf_counter() - t0
            self.last_cpu = time.process_time() - c0
            self.step_no += 1
            return dt, hook
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = model(**self.batch).loss
            if method is not None:
                reg = method.extra_loss(model)
                if reg is not None:
                    loss = loss + reg
        if count:
            self.nodes = autograd_nodes(loss)
        loss.backward()
        hook = 0.0
        if count:
            self.tensors = 0
        if method is not None:
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if count:
                self.tensors = len(params)
            norm = clip_gradients(params, self.clip)
            if not torch.isfinite(norm):  # the loop stops here (train.py); a benchmark must not go on silently
                raise RuntimeError(f"{self.key}: non-finite gradient norm at step {self.step_no}")
            hook = optimizer_step(self.step_no, model, method, opt, sched)
        sync(self.device)
        dt = time.perf_counter() - t0
        self.last_cpu = time.process_time() - c0
        self.step_no += 1
        return dt, hook + self.score_s

    def _captured_step(self) -> float:
        if self.stepper is not None:
            return self.stepper.run(self.step_no, self.batch)

        def floor() -> None:  # forward and backward to the adapted modules' outputs, as one graph
            self.floor_leaves.clear()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast, cache_enabled=False):
                loss = self.model(**self.batch).loss
            loss.backward()

        if self.device.type != "cuda":
            floor()
        elif self.floor_graph is not None:
            self.floor_graph.replay()
        elif self.floor_warm < 2:
            self.floor_warm += 1
            floor()
        else:
            self.floor_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.floor_graph):
                floor()
            self.floor_graph.replay()
        return 0.0

    def check_finite(self) -> None:
        """Captured steps check nothing per step: whether any loss or gradient norm was not finite."""
        bad = None if self.stepper is None else self.stepper.first_bad_step()
        if bad is not None:
            raise RuntimeError(f"{self.key}: non-finite loss or gradient norm at step {bad}")

    # -- accounting -------------------------------------------------------------------------------------
    def ranks(self) -> tuple[float | None, float | None]:
        """(average effective rank, average rank computed in the forward)."""
        if self.method is None or self.spec.method == "full":
            return None, None
        from triadapt.methods.core import AdaptedLinear

        eff = self.method.ranks(self.model)
        computed = []
        for mod in self.model.modules():
            if isinstance(mod, AdaptedLinear):
                computed.append(mod.rank)
            elif hasattr(mod, "lora_A") and isinstance(getattr(mod, "lora_A"), nn.ModuleDict | nn.ParameterDict):
                a = mod.lora_A["default"]
                computed.append((a.weight if hasattr(a, "weight") else a).shape[0])
        avg = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        return avg(list(eff.values())), avg(computed)


def autograd_nodes(t: torch.Tensor) -> int:
    """Nodes of the backward graph behind ``t`` (one AccumulateGrad per leaf tensor included)."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    return len(seen)


def count_per_step(runners: list[Runner]) -> None:
    """One more, untimed step per runner that counts its autograd nodes and gradient tensors."""
    for r in runners:
        r.step(count=True)
        r.check_finite()


def replay_increlora(m, model, optimizer, scheduler, run_steps: int) -> int:
    """Grow IncreLoRA to its target through ``load_state_dict`` (a resume), with the schedule's own
    events, top_h and Δr; modules picked by lowest current rank. Returns the last event step."""
    names = list(m.ranknum)
    ranknum, total = dict(m.ranknum), m.total
    history, last = [], 0
    for t in range(m.init_warmup + 1, run_steps):
        if total >= m.target_total:
            break
        if t % m.interval:
            continue
        remaining = m.target_total - total
        fit = remaining if m.overshoot == "allow" else remaining // m.delta_r
        k = min(m.top_h, fit, len(names))
        selected = sorted(names, key=lambda n: (ranknum[n], names.index(n)))[:k]
        for n in selected:
            ranknum[n] += m.delta_r
            total += m.delta_r
        history.append({"step": t, "selected": selected, "threshold": 0.0, "total_rank": total})
        last = t
    state = {"ranknum": ranknum, "total": total, "reserve_added": True, "finished": total >= m.target_total,
             "history": history, "raw": {}, "ema_ipt": None, "ema_unc": None}
    m.load_state_dict(state, model, optimizer, scheduler)
    return last


def replay_triadapt(m, optimizer, scheduler) -> int:
    """Grow TriAdaptLoRA to R* through ``load_state_dict``: the schedule's own events and m_t rule,
    modules picked by lowest current rank; a last event adds what the rule leaves. Returns its step."""
    from triadapt.methods.triadapt import growth_count

    names = list(m.layers)
    ranks = {n: layer.rank for n, layer in m.layers.items()}
    total, history, last = m.total_rank, [], 0
    steps = list(m._event_steps())
    for i, t in enumerate(steps):
        if total >= m.target_total:
            break
        count = growth_count(m.target_total - total, m._progress(t), len(names), m.growth)
        if i == len(steps) - 1:
            count = len(names)
        picked = sorted(names, key=lambda n: (ranks[n], n))[:count]
        selected = []
        for n in picked:
            k = m.delta_r if m.overshoot == "allow" else min(m.delta_r, m.target_total - total)
            if k <= 0:
                break
            ranks[n] += k
            total += k
            selected.append(n)
        history.append({"step": t, "progress": m._progress(t), "m": count, "threshold": None,
                        "selected": selected, "total_rank": total})
        last = t
    state = m.state_dict() | {"history": history}
    m.load_state_dict(state, None, optimizer, scheduler)
    return last


def build_base(model_cfg: DictConfig, seed: int):
    from triadapt.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_cfg)
    torch.manual_seed(seed)
    model = load_model(model_cfg, "sequence_classification", 2, tokenizer)
    return model, tokenizer


def make_batch(model: nn.Module, batch_size: int, seq_len: int, device: torch.device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return {
        "input_ids": torch.randint(1000 if vocab > 2000 else 5, vocab, (batch_size, seq_len), generator=g).to(device),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=device),
        "labels": torch.randint(0, 2, (batch_size,), generator=g).to(device),
    }


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def paired_ratio(a: list[float], b: list[float]) -> float | None:
    """Median over rounds of a[i] / b[i] (both measured in the same round)."""
    pairs = [x / y for x, y in zip(a, b) if y > 0]
    return statistics.median(pairs) if pairs else None


def ratio_quantile(a: list[float], b: list[float], q: float) -> float | None:
    pairs = [x / y for x, y in zip(a, b) if y > 0]
    return quantile(pairs, q) if pairs else None


def interleave(runners: list[Runner], rounds: int, warmup: int, log=print) -> None:
    """Prepare every runner, then warm-up rounds, then ``rounds`` timed rounds: A B C … rotated by
    one each round and reversed every other round (A B C, C B A …), so that neighbours in ``runners``
    stay neighbours and a drift of the machine's load within a pair cancels over two rounds."""
    for r in runners:
        r.prepare()
    n = len(runners)
    for i in range(warmup + rounds):
        order = [runners[(j + i // 2) % n] for j in range(n)]
        if i % 2:
            order.reverse()
        for r in order:
            gc.collect()
            gc.disable()
            try:
                dt, hook = r.step()
            finally:
                gc.enable()
            if i >= warmup:
                r.times.append(dt)
                r.cpu.append(r.last_cpu)
                r.hooks.append(hook)
        if i >= warmup:
            log(f"  round {i - warmup + 1}/{rounds}: " + " ".join(f"{r.key}={r.times[-1]:.2f}s" for r in runners))


def series(r: Runner, clock: str) -> list[float]:
    return r.cpu if clock == "cpu" else r.times


def timing_row(r: Runner, floor: Runner | None, lora: Runner | None, clock: str = "wall") -> dict:
    t = r.times
    c = series(r, clock)
    fc = series(floor, clock) if floor is not None else None
    lc = series(lora, clock) if lora is not None else None
    eff, computed = r.ranks()
    return {
        "variant": r.key,
        "method": r.spec.method,
        "phase": r.spec.phase,
        "n": len(t),
        "median_s": statistics.median(t),
        "mean_s": statistics.fmean(t),
        "p25_s": quantile(t, 0.25),
        "p75_s": quantile(t, 0.75),
        "min_s": min(t),
        "max_s": max(t),
        "spread_pct": 100 * (quantile(t, 0.75) - quantile(t, 0.25)) / statistics.median(t),
        "cpu_median_s": statistics.median(r.cpu),
        "clock": clock,
        "ratio_floor": paired_ratio(c, fc) if fc else None,
        "ratio_floor_p25": ratio_quantile(c, fc, 0.25) if fc else None,
        "ratio_floor_p75": ratio_quantile(c, fc, 0.75) if fc else None,
        "ratio_lora": paired_ratio(c, lc) if lc else None,
        "ratio_floor_wall": paired_ratio(t, floor.times) if floor is not None else None,
        "ratio_lora_wall": paired_ratio(t, lora.times) if lora is not None else None,
        "ratio_floor_cpu": paired_ratio(r.cpu, floor.cpu) if floor is not None else None,
        "ratio_lora_cpu": paired_ratio(r.cpu, lora.cpu) if lora is not None else None,
        "hook_median_ms": 1e3 * statistics.median(r.hooks),
        "hook_mean_ms": 1e3 * statistics.fmean(r.hooks),
        "hook_max_ms": 1e3 * max(r.hooks),
        "rank_effective": eff,
        "rank_computed": computed,
        "trainable_params": sum(p.numel() for p in r.model.parameters() if p.requires_grad),
        "grad_tensors": r.tensors,
        "autograd_nodes": r.nodes,
        "_times": list(t),
        "_cpu": list(r.cpu),
        "_series": list(c),
        "_hooks": list(r.hooks),
    }
