"""Whole training steps replayed as CUDA graphs (``train.cuda_graphs``).

An eager adapter step on a GPU is bound by the host: hundreds of small kernels launched one by one
from Python, plus a host sync per step for the loss and the finite checks. Here a step — forward,
loss and regulariser, backward, clipping, AdamW and the learning-rate schedule — is recorded once as
a CUDA graph and replayed with one launch. What that needs:

* static shapes: batches are padded to a power-of-two length bucket (:func:`pad_to_bucket`), and one
  graph is kept per (batch shape, parameter set) — a growth event adds parameters, so the graphs
  are captured again (counted and timed in :attr:`CapturedSteps.captures`);
* no host sync inside the step: the loss, its regulariser and a first-non-finite-step marker are
  accumulated on the device and read when the loop logs, evaluates or checkpoints
  (:meth:`CapturedSteps.drain`); a non-finite loss or gradient norm skips AdamW's update in the
  kernel itself (``found_inf``), so no poisoned state is ever written;
* AdamW with ``capturable`` state and per-group learning rates as device tensors, updated inside the
  graph (:meth:`GroupedLinearSchedule.tensor_step`);
* methods say what their hooks do at a step (:meth:`Method.capture_mode`): ``graph`` — recorded
  with the step; ``split`` — host work between backward and update (allocation phases): forward,
  backward and clipping replay as a graph, the hooks and AdamW run eagerly; ``eager`` — the forward
  or backward itself does method work (IncreLoRA's gradient hooks): the step runs eagerly.

Without CUDA the same code runs uncaptured (same padding, same device-side bookkeeping), which is
what the CPU tests exercise; the graph replay itself is tested on a GPU (``tests/test_cuda.py``).
"""

from __future__ import annotations

import logging
import math
import time

import torch

from triadapt.train import clip_gradients

log = logging.getLogger("triadapt")

#: eager steps run for a new (shape, parameter set) before its graph is captured: lazy state
#: (AdamW moments, cuBLAS workspaces, autocast) must exist before capture, as torch's recipe says
WARMUP_STEPS = 2


def bucket_length(length: int, max_length: int) -> int:
    """The padded length of a batch of ``length`` tokens: the next power of two (at least 16),
    at most ``max_length``. A handful of buckets, so a handful of graphs."""
    return min(max_length, max(16, 1 << max(0, math.ceil(math.log2(max(1, length))))))


def pad_to_bucket(batch: dict, max_length: int, pad_id: int) -> dict:
    """Pad every (batch, length) tensor of ``batch`` on the right to the bucket length:
    ``input_ids`` with the pad token, masks and type ids with 0. Padded positions are masked."""
    length = batch["input_ids"].shape[1]
    target = bucket_length(length, max(max_length, length))
    if target == length:
        return batch
    out = {}
    for key, value in batch.items():
        if value.dim() == 2 and value.shape[1] == length:
            fill = pad_id if key == "input_ids" else 0
            value = torch.nn.functional.pad(value, (0, target - length), value=fill)
        out[key] = value
    return out


def record(body) -> torch.cuda.CUDAGraph:
    """Capture ``body`` as a CUDA graph (nothing runs until ``replay``)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def on_side_stream(device: torch.device, fn):
    """``fn()`` on a side stream, ordered after and before the current stream's work: torch's
    recipe for the warm-up iterations before a capture."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream(device).wait_stream(side)
    return out


class _Graph:
    """One captured graph and everything its replay writes to: kept alive so that no later
    capture is handed memory this graph still writes to."""

    def __init__(self, graph, grads: list) -> None:
        self.graph, self.grads = graph, grads


class CapturedSteps:
    """Runs training steps for the loop: captured and replayed on CUDA, uncaptured elsewhere."""

    def __init__(self, *, model, method, optimizer, scheduler, clip: float, autocast: bool,
                 device: torch.device, start_step: int) -> None:
        self.model, self.method, self.optimizer, self.scheduler = model, method, optimizer, scheduler
        self.clip, self.autocast, self.device = clip, autocast, device
        self.use_graphs = device.type == "cuda"
        self.step_t = torch.full((), start_step, dtype=torch.int64, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        # [log window, progress window] × [task loss, regulariser, steps]
        self.sums = torch.zeros(2, 3, dtype=torch.float64, device=device)
        self.last_loss = torch.zeros((), dtype=torch.float32, device=device)
        self.has_reg = False
        for group in optimizer.param_groups:  # also groups restored from an uncaptured run's checkpoint
            group["capturable"] = True
        optimizer.defaults["capturable"] = True
        optimizer.found_inf = self.found_inf  # fused AdamW skips the whole update when it is 1
        scheduler.use_tensor_lrs(device)
        self.inputs: dict[tuple, dict[str, torch.Tensor]] = {}
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: dict[tuple, int] = {}
        self.uncapturable: dict[tuple, str] = {}  # key → why its capture failed (it runs eagerly)
        self.structure: tuple | None = None
        self.captures, self.capture_s = 0, 0.0
        self.grads_bound = False  # whether p.grad may point into a graph's memory

    # -- the step ------------------------------------------------------------------------------------
    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _structure(self) -> tuple:
        groups = self.optimizer.param_groups
        return len(groups), sum(len(g["params"]) for g in groups), sum(p.requires_grad for p in groups[-1]["params"])

    def _forward_backward(self, inputs: dict) -> None:
        """Forward, loss, backward, clipping and the device-side bookkeeping; no host sync."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast, cache_enabled=False):
            task_loss = self.model(**inputs).loss
            reg = self.method.extra_loss(self.model)
        loss = task_loss if reg is None else task_loss + reg
        loss.backward()
        params = [p for p in self._params() if p.grad is not None]
        grad_norm = clip_gradients(params, self.clip)
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        self.found_inf.copy_(~finite)
        self.bad_step.copy_(torch.where((self.bad_step < 0) & ~finite, self.step_t, self.bad_step))
        self.has_reg = reg is not None
        zero = self.last_loss.new_zeros(())
        parts = [task_loss.detach().float(), zero if reg is None else reg.detach().float(), zero + 1]
        self.sums.add_(torch.stack(parts).double())
        self.last_loss.copy_(task_loss.detach())

    def _update(self, step: int, captured: bool) -> None:
        """AdamW and the schedule: as device ops on ``step_t`` when recorded in a graph."""
        self.optimizer.step()
        if captured:
            self.scheduler.tensor_step(self.step_t + 1)
        else:
            self.scheduler.step()
        self.step_t.add_(1)

    def _eager(self, step: int, inputs: dict) -> float:
        """The step uncaptured; returns the seconds spent in the method's hooks."""
        self._release_grads()
        self._forward_backward(inputs)
        hook_s = self._hooks_and_update(step)
        self.optimizer.zero_grad(set_to_none=True)
        return hook_s

    def _hooks_and_update(self, step: int) -> float:
        """The method's hooks around an eager AdamW step; returns the seconds spent in the hooks."""
        t0 = time.perf_counter()
        self.method.before_step(step, self.model, self.optimizer, self.scheduler)
        hook_s = time.perf_counter() - t0
        self._update(step, captured=False)
        t0 = time.perf_counter()
        self.method.after_step(step, self.model, self.optimizer, self.scheduler)
        return hook_s + time.perf_counter() - t0

    def _release_grads(self) -> None:
        """Before eager work: gradients must not point into a graph's memory (an eager backward
        would accumulate into it)."""
        if self.grads_bound:
            self.model.zero_grad(set_to_none=True)
            self.grads_bound = False

    def _static_inputs(self, batch: dict) -> tuple[tuple, dict]:
        shape = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items()))
        static = self.inputs.get(shape)
        if static is None:
            static = self.inputs[shape] = {k: torch.empty_like(v, device=self.device) for k, v in batch.items()}
        for k, v in batch.items():
            static[k].copy_(v, non_blocking=True)
        return shape, static

    def _capture(self, key: tuple, body) -> _Graph | None:
        """Record ``body`` (nothing runs); None when an operation in it cannot be recorded (one
        that waits for the host, e.g. a data-dependent size): such steps then run eagerly."""
        t0 = time.perf_counter()
        self._release_grads()
        self.scheduler.prepare_tensor_step()  # its constants are copied to the device: not inside a capture
        try:
            graph = record(body)
        except Exception as e:  # noqa: BLE001 - whatever the op, the step is still run, eagerly
            self.model.zero_grad(set_to_none=True)
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self.uncapturable[key] = reason
            log.warning("a %s step could not be captured (%s: %s); such steps run eagerly", key[0], type(e).__name__, reason)
            return None
        grads = [p.grad for p in self._params()]
        self.grads_bound = True
        self.capture_s += time.perf_counter() - t0
        self.captures += 1
        self.graphs[key] = _Graph(graph, grads)
        return self.graphs[key]

    def run(self, step: int, batch: dict) -> float:
        """One training step; returns the seconds spent in eager method hooks."""
        mode = self.method.capture_mode(step)
        shape, inputs = self._static_inputs(batch)
        structure = self._structure()
        if structure != self.structure:  # new parameters: every graph is stale
            self.graphs.clear()
            self.seen.clear()
            self.structure = structure
        key = (mode, shape)
        warm = self.seen.get(key, 0) >= WARMUP_STEPS
        if mode == "eager" or not self.use_graphs or not warm or key in self.uncapturable:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.use_graphs and mode != "eager":  # a warm-up step before this kind's capture
                return on_side_stream(self.device, lambda: self._eager(step, inputs))
            return self._eager(step, inputs)
        hook_s = 0.0
        if mode == "graph":
            graph = self.graphs.get(key)
            if graph is None:
                def whole() -> None:
                    self._forward_backward(inputs)
                    self.method.before_step(step, self.model, self.optimizer, self.scheduler)
                    self._update(step, captured=True)
                    self.method.after_step(step, self.model, self.optimizer, self.scheduler)
                graph = self._capture(key, whole)
                if graph is None:
                    return self._eager(step, inputs)
            graph.graph.replay()
            self.scheduler.current_step += 1
        else:  # split: forward/backward/clipping replayed, hooks and AdamW eager
            graph = self.graphs.get(key) or self._capture(key, lambda: self._forward_backward(inputs))
            if graph is None:
                return self._eager(step, inputs)
            graph.graph.replay()
            for p, g in zip(self._params(), graph.grads):
                p.grad = g
            hook_s = self._hooks_and_update(step)
            self.model.zero_grad(set_to_none=True)
            self.grads_bound = False
        return hook_s

    # -- reading back (one host sync) ------------------------------------------------------------------
    def settle(self) -> None:
        """Before anything reads the model outside the graphs (evaluation, checkpoints): graph
        replays update parameters without autograd's version counters, which caches key on."""
        if self.captures:
            for p in self._params():
                torch.autograd.graph.increment_version(p)

    def drain(self, window: int) -> tuple[float, float | None, int]:
        """(mean task loss, mean regulariser or None, steps) of a window (0: logging, 1: progress
        lines) since its last drain; one host sync."""
        values = self.sums[window].tolist()
        self.sums[window].zero_()
        n = int(values[2])
        if not n:
            return float("nan"), None, 0
        return values[0] / n, values[1] / n if self.has_reg else None, n

    def first_bad_step(self) -> int | None:
        """The first step whose loss or gradient norm was non-finite (its update was skipped)."""
        bad = int(self.bad_step)
        return None if bad < 0 else bad

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def summary(self) -> str:
        failed = f"; {len(self.uncapturable)} kinds of step ran eagerly ({next(iter(self.uncapturable.values()))})" if self.uncapturable else ""
        return f"{self.captures} graph captures in {self.capture_s:.2f}s{failed}"
