"""The timing sections: ``main`` (every method at the run's model and batch), ``overhead`` (the
dispatch-bound regime) and ``growth`` (one TriAdaptLoRA growth event)."""

from __future__ import annotations

import copy
import gc
import statistics
import time

import torch

from triadapt.bench.config import ADAPTIVE, method_config, model_config
from triadapt.bench.machine import sync
from triadapt.bench.report import GROWTH_EVENT_TARGET_MS
from triadapt.bench.runner import (
    Runner,
    Spec,
    build_base,
    count_per_step,
    interleave,
    make_batch,
    timing_row,
)


def main_specs(methods: list[str], rank: int, dropout: float | None, capture: bool = False) -> list[Spec]:
    """Every method at its final rank, the adaptive ones also in their allocation phase; with
    ``capture`` each variant twice, eager and as captured steps (``+graph``), side by side."""
    specs = []
    extra = {} if dropout is None else {"dropout": dropout}
    for m in methods:
        over = dict(extra) if m not in ("floor", "full") else {}
        specs.append(Spec(m, "steady", rank, over))
    for m in methods:
        if m in ADAPTIVE:
            specs.append(Spec(m, "growth", rank, dict(extra)))
    if capture:  # peft's methods are not captured (peft_adalora's hooks are host-side)
        specs += [Spec(s.method, s.phase, s.rank, dict(s.overrides), capture=True) for s in specs
                  if not s.method.startswith("peft_")]
    return specs


#: timing order of the main section: the pairs the targets compare are neighbours
PAIRING_ORDER = ["floor", "lora", "peft_lora", "triadapt", "triadapt:growth", "increlora", "increlora:growth",
                 "adalora", "peft_adalora", "adalora:growth", "peft_adalora:growth", "full"]


def run_main(args, model_cfg, base, device, log) -> list[dict]:
    batch = make_batch(base, args.batch_size, args.seq_len, device, args.seed)
    specs = main_specs(args.methods, args.rank, args.dropout, args.capture)
    log(f"main: {len(specs)} variants, {args.warmup} warm-up + {args.steps} timed rounds, "
        f"batch {args.batch_size} × seq {args.seq_len}, rank {args.rank}")
    runners = [Runner(s, base, model_cfg, batch, device, args.run_steps, args.warmup, args.seed, args.autocast) for s in specs]
    rank = {k: i for i, k in enumerate(PAIRING_ORDER + [f"{k}+graph" for k in PAIRING_ORDER])}
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
