"""The training loop: explicit, method-agnostic, resumable.

Per optimizer step (``step`` counts the steps already taken, 0-based)::

    forward → task loss (+ method.extra_loss) → backward → clip
    → method.before_step → optimizer.step → scheduler.step → method.after_step → zero_grad

Evaluation runs every ``train.eval_every`` steps (or once per epoch) and at the end; the
best evaluation by the task's main metric is tracked. Checkpoints hold everything needed
to continue bit-identically: weights, optimizer (grown groups included), per-group LR
schedules, the method's allocator state, RNG states and the data position (batches are a
pure function of seed and epoch, so the step number is the data position). A non-finite
loss or gradient norm stops the run (:class:`TrainingDiverged`) before the optimizer step,
after checkpointing the weights as they were: the last good state. An update that makes the
parameters or the optimizer state non-finite stops the run too; nothing non-finite is ever
checkpointed, so the newest checkpoint on disk is the last good state. Checkpoints carry the
resolved config of their run, which decides whether a later run may resume them.

A checkpoint of the end state is written before the final evaluation and the final files, so
a failure there (a full disk) leaves a resumable run; the run removes it once complete.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import random
import resource
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from triadapt.data import TaskData
from triadapt.errors import TrainingDiverged, TriadaptError
from triadapt.methods.base import Method
from triadapt.methods.core import adapted_layers
from triadapt.schedules import GroupedLinearSchedule
from triadapt.tracking import atomic_path, write_metrics_log

CHECKPOINT_DIR = "checkpoints"
PROGRESS_EVERY_S = 30.0  # off a terminal: at least one progress line this often
#: Test-only: stop as a signal would after this many steps of a process (checkpoint, `interrupted`),
#: so a test can run a command exactly as written, configuration unchanged, and stop it early.
STOP_AFTER_ENV = "TRIADAPT_STOP_AFTER_STEPS"
log = logging.getLogger("triadapt")


class Interrupted(TriadaptError):
    """SIGTERM/SIGINT: a checkpoint was written, the run can be resumed."""


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS is only deterministic with a fixed workspace, set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def build_optimizer(groups: list[dict], lr: float, betas, eps: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over ``groups``; groups added later (grown components) inherit the kernel choice.

    Adapters hold many small tensors (TriAdaptLoRA: four per rank and matrix, 2,304 on BERT-base),
    and a per-tensor update costs more in dispatch than in arithmetic. ``fused`` updates every
    tensor of a group in one C++ kernel (CPU and CUDA; ~3.5× faster than ``foreach`` on 2,304
    tensors here); it is the same AdamW, rounded differently in the last bit. ``fused=False``
    takes torch's multi-tensor (``foreach``) path, bitwise equal to the per-tensor loop."""
    params = [p for g in groups for p in g["params"]]
    fused = fused and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None, foreach=not fused or None)


def configure_precision(precision: str, tf32: bool, device: torch.device) -> bool:
    """Whether the forward runs under bf16 autocast (``bf16``, or ``auto`` on CUDA); on CUDA, fp32
    matmuls may use TF32 only when ``tf32`` says so (set either way: the run does not inherit it)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Total gradient norm of ``params``, clipped to ``max_norm`` when it is > 0. ``foreach`` (one
    C++ loop instead of a Python one per tensor, same kernels, same result) matters on the CPU,
    where torch would not choose it by itself."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)


def optimizer_step(step: int, model, method, optimizer, scheduler) -> float:
    """One update after backward and clipping: the method's hooks around AdamW and the schedule.
    Returns the seconds spent in the hooks (allocation work, reported apart from the step)."""
    h0 = time.perf_counter()
    method.before_step(step, model, optimizer, scheduler)
    hook_s = time.perf_counter() - h0
    optimizer.step()
    scheduler.step()
    h0 = time.perf_counter()
    method.after_step(step, model, optimizer, scheduler)
    hook_s += time.perf_counter() - h0
    optimizer.zero_grad(set_to_none=True)
    return hook_s


def all_finite(tensors) -> bool:
    """Whether every floating tensor holds only finite values: one max-|x| kernel per
    (device, dtype) group (NaN and inf propagate into the max), one sync."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            groups.setdefault((t.device, t.dtype), []).append(t.detach())
    return all(bool(torch.stack(torch._foreach_norm(ts, float("inf"))).isfinite().all()) for ts in groups.values())


def _trained_state_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the parameters ``optimizer`` updates and its state (the Adam moments) are all finite."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return all_finite(params + state)


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    # RNG states are CPU byte tensors; a checkpoint loaded onto the GPU brings them there
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, lengths: list[int] | None = None) -> list[list[int]]:
    """The batches of one epoch: a seeded shuffle, optionally grouped by length.

    Length grouping sorts each mega-batch of 50 batches by length (longest first) so that
    batches hold similar lengths and dynamic padding wastes little, while the epoch still
    visits every example once in a shuffled order.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    if lengths:
        mega = batch_size * 50
        perm = [i for s in range(0, n, mega) for i in sorted(perm[s : s + mega], key=lambda i: -lengths[i])]
    batches = [perm[s : s + batch_size] for s in range(0, n, batch_size)]
    if lengths:
        order = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in order]
    return batches


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class LoopState:
    step: int = 0
    evals: list[dict] = field(default_factory=list)
    best: dict | None = None
    best_step: int | None = None
    train_s: float = 0.0
    hook_s: float = 0.0
    step_times: list[float] = field(default_factory=list)


class Trainer:
    def __init__(
        self,
        *,
        model: torch.nn.Module,
        method: Method,
        task: TaskData,
        optimizer: torch.optim.Optimizer,
        scheduler: GroupedLinearSchedule,
        train_cfg,
        total_steps: int,
        steps_per_epoch: int,
        main_metric: str,
        device: torch.device,
        run_dir: Path,
        seed: int,
        log: Callable[[dict, int], None] = lambda values, step: None,
        group_by_length: bool = False,
        config: dict | None = None,
        max_length: int | None = None,
    ) -> None:
        self.model = model
        self.method = method
        self.task = task
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.cfg = train_cfg
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.main_metric = main_metric
        self.device = device
        self.run_dir = Path(run_dir)
        self.seed = seed
        self.log = log
        self.config = config  # the run's resolved settings, stored in every checkpoint
        self.lengths = task.train_lengths if group_by_length else None
        self.state = LoopState()
        self.eval_every = int(train_cfg.eval_every or steps_per_epoch)
        self.checkpoint_every = int(train_cfg.get("checkpoint_every") or 0)
        self.keep_checkpoints = int(train_cfg.get("keep_checkpoints") or 1)
        self._stop_signal: int | None = None
        self.autocast = configure_precision(train_cfg.precision, bool(train_cfg.get("tf32", False)), device)
        self._epoch_cache: tuple[int, list[list[int]]] | None = None
        # train.cuda_graphs: whole steps captured and replayed (triadapt.step_capture); batches are
        # padded to length buckets so that a handful of graphs serve the whole run
        self.capture = bool(train_cfg.get("cuda_graphs", False))
        self.max_length = max_length
        self.stepper = None

    # -- data ------------------------------------------------------------------------------
    def _batch(self, step: int) -> dict:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, epoch_batches(len(self.task.train), self.cfg.batch_size, self.seed, epoch, self.lengths))
        idx = self._epoch_cache[1][pos]
        batch = self.task.collate([self.task.train[i] for i in idx])
        if self.capture:
            from triadapt.step_capture import pad_to_bucket  # imports this module

            pad_id = getattr(self.model.config, "pad_token_id", None) or 0
            return pad_to_bucket(batch, self.max_length or batch["input_ids"].shape[1], pad_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    # -- checkpoints -----------------------------------------------------------------------
    def _checkpoint_keys(self) -> set[str]:
        return {
            n for n, p in self.model.named_parameters() if p.requires_grad or ".lora_" in n or ".core." in n
        }

    def save_checkpoint(self, prune: bool = True) -> Path:
        """Write the state after ``state.step`` steps; never a non-finite one. ``prune=False``
        keeps the older checkpoints (the end-of-run checkpoint is not one of the kept ones)."""
        keys = self._checkpoint_keys()
        if not _trained_state_finite(self.optimizer):
            raise TrainingDiverged(
                f"refusing to checkpoint non-finite parameters or optimizer state at step {self.state.step}; "
                f"{self._last_good()}"
            )
        payload = {
            "config": self.config,
            "method_name": self.method.name,
            "step": self.state.step,
            "model": {k: v for k, v in self.model.state_dict().items() if k in keys},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "method": self.method.state_dict(),
            "rng": rng_state(),
            "loop": self.state.__dict__,
        }
        path = self.run_dir / CHECKPOINT_DIR / f"step-{self.state.step:08d}.pt"
        with atomic_path(path, need_bytes=_nbytes(payload)) as tmp:
            torch.save(payload, tmp)
        if prune:
            for old in sorted(path.parent.glob("step-*.pt"))[: -self.keep_checkpoints]:
                old.unlink()
        return path

    def _last_good(self) -> str:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return "no checkpoint was saved before (train.checkpoint_every=0)"
        return f"the last good state is {path}"

    def load_checkpoint(self, path: Path) -> None:
        # Temp files of a checkpoint write cut short by a kill: never complete, never read.
        for stale in path.parent.glob(".step-*.tmp"):
            stale.unlink(missing_ok=True)
        try:
            payload = torch.load(path, map_location=self.device, weights_only=False)
            if payload.get("method_name", self.method.name) != self.method.name:
                raise TriadaptError(
                    f"{path} is a checkpoint of method {payload['method_name']}, not {self.method.name}; "
                    "resume with its method, or choose another run dir"
                )
            self.method.load_state_dict(payload["method"], self.model, self.optimizer, self.scheduler)
            missing, unexpected = self.model.load_state_dict(payload["model"], strict=False)
            if unexpected or (self._checkpoint_keys() - set(payload["model"])):
                raise ValueError(f"checkpoint does not fit the model (unexpected keys: {unexpected[:3]})")
            self.optimizer.load_state_dict(payload["optimizer"])
            self.scheduler.load_state_dict(payload["scheduler"])
            set_rng_state(payload["rng"])
            self.state = LoopState(**payload["loop"])
        except TriadaptError:
            raise
        except Exception as e:
            reason = (str(e).strip().splitlines() or [""])[0]  # torch errors may append a C++ backtrace
            raise TriadaptError(
                f"cannot resume from {path} ({type(e).__name__}: {reason}); "
                "delete the checkpoint or the run dir to start over"
            ) from None
        # The killed run may have logged evaluations past the checkpoint; they are replayed.
        write_metrics_log(self.run_dir, self.state.evals)
        log.info("resumed from %s at step %d/%d", path, self.state.step, self.total_steps)

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self, final: bool = False) -> dict:
        s = self.state
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            metrics = self.task.evaluate(self.model, self.device, int(self.cfg.eval_batch_size), self.run_dir if final else None)
        # Strict JSON has no NaN: an undefined metric (a correlation over constant labels) is
        # recorded as null, with the reason beside it, and never counts as the best evaluation.
        undefined = {k: v for k, v in metrics.items() if v is None or not math.isfinite(v)}
        metrics = {k: None if k in undefined else v for k, v in metrics.items()}
        record = {"step": s.step, "epoch": round(s.step / self.steps_per_epoch, 4), "metrics": metrics}
        if undefined:
            record["undefined"] = {
                k: f"{v} is not a number: undefined here (e.g. a correlation over constant labels or predictions)"
                for k, v in undefined.items()
            }
        s.evals.append(record)
        value = metrics.get(self.main_metric)
        best = None if s.best is None else s.best.get(self.main_metric)
        if value is not None and (best is None or value > best):
            s.best, s.best_step = metrics, s.step
            if self.cfg.get("save_adapter", True):
                self.save_adapter("adapter_best.safetensors")
        write_metrics_log(self.run_dir, s.evals)
        log.info("step %d/%d eval: %s", s.step, self.total_steps, ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
        self.log({f"eval/{k}": v for k, v in metrics.items() if v is not None}, s.step)
        return metrics

    def save_adapter(self, name: str) -> None:
        adapter = self.method.adapter_state(self.model)
        tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.items()}
        with atomic_path(self.run_dir / name, need_bytes=_nbytes(tensors)) as tmp:
            save_file(tensors, str(tmp))
        # Beside it, what else training changed (the task head; IncreLoRA's reserve) and each adapted
        # layer's scale: with the adapter, enough to rebuild the trained model (python -m triadapt.export).
        keys = self._checkpoint_keys()
        rest = {
            k: p.detach().contiguous().cpu() for k, p in self.model.named_parameters() if k in keys and k not in adapter
        }
        scales = {n: float(layer.scale) for n, layer in adapted_layers(self.model)}
        with atomic_path(self.run_dir / name.replace("adapter", "head"), need_bytes=_nbytes(rest)) as tmp:
            save_file(rest, str(tmp), metadata={"scales": json.dumps(scales)})

    # -- the loop --------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def _diverged(self, what: str) -> None:
        """Save the weights as they are (no update from the bad step applied yet) and stop."""
        path = self.save_checkpoint()
        raise TrainingDiverged(
            f"{what} at step {self.state.step}; last good state saved to {path}. "
            "Lower train.lr or fix the data, then start a new run dir"
        )

    def fit(self, resume_from: Path | None = None) -> dict:
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        handlers = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # not the main thread (e.g. a joblib worker thread)
            pass
        try:
            return self._fit()
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)

    def _fit(self) -> dict:
        s = self.state
        # At a terminal: the bar. Elsewhere (SLURM, nohup, `> log`) tqdm draws nothing useful, so
        # a log line every train.log_every steps or PROGRESS_EVERY_S seconds says where the run is.
        interactive = sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=s.step, desc="train", dynamic_ncols=True, disable=not interactive)
        progress = None if interactive else ProgressLog(self.total_steps, s.step, self.steps_per_epoch, int(self.cfg.log_every))
        try:
            return self._loop(bar, progress)
        finally:
            bar.close()  # before any error line, which must not land on the bar's line

    def _eager_step(self, step: int, batch: dict, clip: float) -> tuple[float, float, float | None]:
        """One uncaptured step with its host-side checks: (hook seconds, task loss, regulariser)."""
        model = self.model
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            task_loss = model(**batch).loss
            reg = self.method.extra_loss(model)
        loss = task_loss if reg is None else task_loss + reg
        if not torch.isfinite(loss):
            self._diverged(f"loss is {loss.item()}")
        loss.backward()
        # A non-finite gradient would poison the weights: stop before the optimizer step.
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        grad_norm = clip_gradients(params, clip)
        if not torch.isfinite(grad_norm):
            self._diverged(f"gradient norm is {grad_norm.item()}")
        hook_s = optimizer_step(step, model, self.method, self.optimizer, self.scheduler)
        self._check_state(step)
        return hook_s, task_loss.item(), None if reg is None else reg.item()

    def _check_state(self, step: int) -> None:
        # The update itself can overflow (train.lr=inf, a huge second moment): stop before such a
        # state is evaluated, saved as the best adapter or checkpointed.
        if not _trained_state_finite(self.optimizer):
            raise TrainingDiverged(
                f"the update at step {step} made parameters or optimizer state non-finite; {self._last_good()}. "
                "Lower train.lr or fix the data, then start a new run dir"
            )

    def _check_captured(self) -> None:
        """Captured steps: the checks the eager step makes at every step, made when the loop next
        reads the model (a non-finite loss or gradient norm skipped its update on the device)."""
        bad = self.stepper.first_bad_step()
        if bad is not None:
            raise TrainingDiverged(
                f"loss or gradient norm non-finite at step {bad} (its update was skipped); {self._last_good()}. "
                "Lower train.lr or fix the data, then start a new run dir"
            )
        self._check_state(self.state.step - 1)

    def _loop(self, bar, progress: ProgressLog | None) -> dict:
        s, model = self.state, self.model
        model.train()
        clip = float(self.cfg.max_grad_norm or 0)
        running, running_reg, n_running = 0.0, 0.0, 0
        progress_loss, progress_n = 0.0, 0
        postfix: dict[str, str] = {}
        metrics = s.evals[-1]["metrics"] if s.evals else None
        stop_after = s.step + int(os.environ[STOP_AFTER_ENV]) if os.environ.get(STOP_AFTER_ENV) else None
        if self.capture:
            from triadapt.step_capture import CapturedSteps  # imports this module

            self.stepper = CapturedSteps(model=model, method=self.method, optimizer=self.optimizer,
                                         scheduler=self.scheduler, clip=clip, autocast=self.autocast,
                                         device=self.device, start_step=s.step)
            if self.device.type != "cuda":
                log.info("train.cuda_graphs: no CUDA device, steps run uncaptured (batches still padded to length buckets)")
        stepper = self.stepper
        while s.step < self.total_steps:
            batch = self._batch(s.step)
            t0 = time.perf_counter()
            if stepper is None:
                hook_s, task_loss, reg = self._eager_step(s.step, batch, clip)
                running += task_loss
                running_reg += 0.0 if reg is None else reg
                n_running += 1
                progress_loss, progress_n = progress_loss + task_loss, progress_n + 1
            else:
                hook_s = stepper.run(s.step, batch)
            dt = time.perf_counter() - t0
            s.step += 1
            s.train_s += dt
            s.hook_s += hook_s
            s.step_times.append(dt)
            bar.update(1)
            log_now = s.step % int(self.cfg.log_every) == 0 or s.step == self.total_steps
            eval_now = s.step % self.eval_every == 0 or s.step % self.steps_per_epoch == 0 or s.step == self.total_steps
            checkpoint_now = self.checkpoint_every and s.step % self.checkpoint_every == 0 and s.step < self.total_steps
            stop_now = self._stop_signal is not None or (s.step == stop_after and s.step < self.total_steps)
            if stepper is not None and (log_now or eval_now or checkpoint_now or stop_now):
                stepper.settle()  # the model is read outside the graphs next
                self._check_captured()
            if s.step == self.total_steps:
                self.save_checkpoint(prune=False)  # the final writes below may fail; this resumes them
            if progress is not None and progress.due(s.step):
                mean = stepper.drain(1)[0] if stepper is not None else progress_loss / progress_n
                progress.emit(s.step, mean, float(self.optimizer.param_groups[0]["lr"]))
                progress_loss, progress_n = 0.0, 0
            if log_now:
                if stepper is not None:
                    mean, reg, n_running = stepper.drain(0)
                    running, running_reg = mean * n_running, (reg or 0.0) * n_running
                lr = float(self.optimizer.param_groups[0]["lr"])
                values = {"train/loss": running / n_running, "train/lr": lr, "train/epoch": s.step / self.steps_per_epoch}
                if reg is not None:
                    values["train/reg_loss"] = running_reg / n_running
                values |= {f"method/{k}": v for k, v in self.method.metrics().items()}
                self.log(values, s.step)
                postfix |= {"loss": f"{running / n_running:.4f}", "lr": f"{lr:.2e}"}
                bar.set_postfix(postfix)
                running, running_reg, n_running = 0.0, 0.0, 0
            if eval_now:
                metrics = self.evaluate(final=s.step == self.total_steps)
                postfix[self.main_metric] = _fmt(metrics[self.main_metric])
                bar.set_postfix(postfix)
            if checkpoint_now:
                self.save_checkpoint()
            if stop_now:
                path = self.save_checkpoint()
                why = f"signal {self._stop_signal}" if self._stop_signal is not None else f"{STOP_AFTER_ENV}={os.environ[STOP_AFTER_ENV]}"
                raise Interrupted(f"stopped by {why} at step {s.step}; resume from {path}")
        if stepper is not None:
            log.info("whole-step capture: %s", stepper.summary())
        if metrics is None or s.evals[-1]["step"] != s.step:
            metrics = self.evaluate(final=True)
        if self.cfg.get("save_adapter", True):
            self.save_adapter("adapter.safetensors")
        return {
            "final": metrics,
            "best": s.best,
            "best_step": s.best_step,
            "steps": s.step,
            "train_s": s.train_s,
            "hook_s": s.hook_s,
            "step_s_median": statistics.median(s.step_times) if s.step_times else None,
            "peak_mem_mb": peak_memory_mb(self.device),
            "graph_captures": None if stepper is None else {"count": stepper.captures, "seconds": round(stepper.capture_s, 3)},
            "final_checkpoint": self.run_dir / CHECKPOINT_DIR / f"step-{s.step:08d}.pt",
        }


def _fmt(value: float | None) -> str:
    return "null" if value is None else f"{value:.4f}"


class ProgressLog:
    """Progress as log lines, for output that is not a terminal: one every ``every`` steps or
    ``PROGRESS_EVERY_S`` seconds, whichever comes first — step/total, epoch, mean loss since the
    last line, learning rate, seconds per step (wall clock, evaluations included) and ETA."""

    def __init__(self, total: int, start_step: int, steps_per_epoch: int, every: int) -> None:
        self.total, self.steps_per_epoch, self.every = total, steps_per_epoch, max(1, every)
        self.started = self.last = time.monotonic()
        self.start_step = self.last_step = start_step

    def due(self, step: int) -> bool:
        return not (step % self.every and time.monotonic() - self.last < PROGRESS_EVERY_S and step < self.total)

    def emit(self, step: int, mean_loss: float, lr: float) -> None:
        """The line for ``step``; ``mean_loss``: the mean task loss since the last line."""
        now = time.monotonic()
        s_per_step = (now - self.last) / max(1, step - self.last_step)
        mean_s = (now - self.started) / max(1, step - self.start_step)
        eta = datetime.timedelta(seconds=round(mean_s * (self.total - step)))
        log.info(
            "step %d/%d (%d%%) | epoch %.2f/%.2f | loss %.4f | lr %.2e | %.2f s/step | ETA %s",
            step, self.total, 100 * step // self.total, step / self.steps_per_epoch, self.total / self.steps_per_epoch,
            mean_loss, lr, s_per_step, eta,
        )
        self.last, self.last_step = now, step


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((Path(run_dir) / CHECKPOINT_DIR).glob("step-*.pt"))
    return ckpts[-1] if ckpts else None


def checkpoint_config(path: Path) -> dict | None:
    """The resolved config a checkpoint was written with (None: written before checkpoints
    carried it). An unreadable checkpoint is a one-line error, and is kept."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        if not isinstance(payload, dict) or "step" not in payload:
            raise ValueError("not a triadapt checkpoint")
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0]  # torch errors may append a C++ backtrace
        raise TriadaptError(
            f"cannot resume from {path} ({type(e).__name__}: {reason}); delete the checkpoint or the run dir to start over"
        ) from None
    return payload.get("config")


def total_steps_for(n_train: int, train_cfg) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch), known before any method is built."""
    if int(train_cfg.batch_size) <= 0:
        raise TriadaptError(f"train.batch_size={train_cfg.batch_size} must be a positive integer")
    steps_per_epoch = math.ceil(n_train / int(train_cfg.batch_size))
    if train_cfg.max_steps is not None:
        if int(train_cfg.max_steps) <= 0:
            raise TriadaptError(
                f"train.max_steps={train_cfg.max_steps} must be a positive integer (or null to use train.epochs)"
            )
        return int(train_cfg.max_steps), steps_per_epoch
    if not train_cfg.epochs or train_cfg.epochs <= 0:
        raise TriadaptError(f"train.epochs={train_cfg.epochs} must be > 0 (or set train.max_steps)")
    return math.ceil(steps_per_epoch * float(train_cfg.epochs)), steps_per_epoch
