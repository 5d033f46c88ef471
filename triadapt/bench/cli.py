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
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from triadapt.bench.config import METHODS, REPO, SECTIONS, model_config
from triadapt.bench.eval_throughput import run_eval
from triadapt.bench.machine import machine_info, set_threads, tune_malloc
from triadapt.bench.memory import measure_memory, run_memory
from triadapt.bench.report import check_targets, summary_markdown, write_csv
from triadapt.bench.runner import build_base
from triadapt.bench.scaling import plot_scaling, run_scaling
from triadapt.bench.sections import run_growth_event, run_main, run_overhead


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m triadapt.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm_l6",
                   help="conf/model name (the *_shape ones are random-init architectures); default minilm_l6")
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
                        "deberta_v3_base_shape and llama_1b_shape)")
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
    p.add_argument("--capture", action="store_true",
                   help="main section: every variant also as whole-step CUDA graphs (train.cuda_graphs), side by side")
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
