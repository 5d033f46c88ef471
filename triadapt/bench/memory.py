"""Peak memory per method, each in a fresh child process (forkserver): VmHWM and peak live malloc
bytes on CPU, ``torch.cuda.max_memory_allocated`` on CUDA."""

from __future__ import annotations

import argparse
import gc
import resource
from pathlib import Path
from typing import Any

import torch

from triadapt.bench.config import model_config
from triadapt.bench.machine import set_threads, tune_malloc
from triadapt.bench.report import fmt
from triadapt.bench.runner import Runner, build_base, make_batch
from triadapt.bench.sections import main_specs


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
    mp.set_forkserver_preload(["torch", "transformers", "peft", "triadapt.bench.memory", "triadapt.methods",
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
