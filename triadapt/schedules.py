"""Learning-rate schedules with one schedule per optimizer param group.

The base schedule is the HF linear one: warm up from 0 to the group's lr over
``warmup_steps``, then decay linearly to 0 at ``total_steps``. Param groups added during
training (grown ranks) pick one of three behaviours:

* ``restart`` — IncreLoRA's ``Multi_LambdaLR``: the group warms up again from 0 over
  ``warmup_steps`` counted from its insertion step, then decays to 0 at the global end;
* ``global`` — the group follows the global schedule from its insertion on;
* ``constant`` — the group keeps its base lr (what a stock ``LambdaLR`` does to groups it
  never saw, as in the TriAdaptLoRA PEFT port).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

NEW_GROUP_SCHEDULES = ("restart", "global", "constant")


def linear_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


@dataclass
class _Group:
    base_lr: float
    start: int
    mode: str  # restart | global | constant


class GroupedLinearSchedule:
    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> None:
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.current_step = 0
        self.groups = [_Group(g["lr"], 0, "global") for g in optimizer.param_groups]
        self.lr_device: torch.device | None = None  # set: each group's lr is a 0-dim fp32 tensor there
        self._constants: tuple | None = None
        self._apply()

    def register_new_group(self, mode: str) -> None:
        """Register the optimizer's last-added param group; call right after ``add_param_group``."""
        if mode not in NEW_GROUP_SCHEDULES:
            raise ValueError(f"new_group_schedule={mode!r}; choose one of {', '.join(NEW_GROUP_SCHEDULES)}")
        if len(self.optimizer.param_groups) != len(self.groups) + 1:
            raise RuntimeError("register_new_group must follow exactly one optimizer.add_param_group")
        group = self.optimizer.param_groups[-1]
        self.groups.append(_Group(float(group["lr"]), self.current_step, mode))
        self._apply()

    def factor(self, index: int) -> float:
        g = self.groups[index]
        if g.mode == "constant":
            return 1.0
        if g.mode == "restart":
            return linear_factor(self.current_step - g.start, self.warmup_steps, self.total_steps - g.start)
        return linear_factor(self.current_step, self.warmup_steps, self.total_steps)

    def _apply(self) -> None:
        for i, (group, meta) in enumerate(zip(self.optimizer.param_groups, self.groups)):
            value = meta.base_lr * self.factor(i)
            if self.lr_device is None:
                group["lr"] = value
            elif isinstance(group["lr"], torch.Tensor) and group["lr"].device == self.lr_device:
                group["lr"].fill_(value)
            else:
                group["lr"] = torch.tensor(value, dtype=torch.float32, device=self.lr_device)

    # -- learning rates as device tensors (captured steps, triadapt.step_capture) -----------------
    def use_tensor_lrs(self, device: torch.device) -> None:
        """Hold every group's lr as a 0-dim fp32 tensor on ``device`` (what a captured AdamW reads)."""
        self.lr_device = device
        self._apply()

    def prepare_tensor_step(self) -> None:
        """Build the per-group constants :meth:`tensor_step` reads (before a capture: no
        host-to-device copy may happen inside one)."""
        if self._constants is not None and self._constants[0] == len(self.groups):
            return
        as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device=self.lr_device)  # noqa: E731
        self._constants = (
            len(self.groups),
            as_tensor([g.base_lr for g in self.groups], torch.float64),
            as_tensor([g.start if g.mode == "restart" else 0 for g in self.groups], torch.float64),
            as_tensor([g.mode == "constant" for g in self.groups], torch.bool),
        )

    def tensor_step(self, step: torch.Tensor) -> None:
        """Set every group's lr for ``step`` (a device tensor) with device ops only — what
        :meth:`step` does, recordable in a CUDA graph; the caller advances ``current_step``. The
        factors are computed in float64 like :func:`linear_factor`'s Python floats."""
        self.prepare_tensor_step()
        _, base, start, constant = self._constants
        s = step.double() - start  # restart groups count from their insertion step
        total = self.total_steps - start
        warm = s / max(1, self.warmup_steps)
        decay = ((total - s) / (total - self.warmup_steps).clamp(min=1)).clamp(min=0.0)
        factor = torch.where(constant, torch.ones_like(s), torch.where(s < self.warmup_steps, warm, decay))
        lrs = (base * factor).float()
        torch._foreach_copy_([g["lr"] for g in self.optimizer.param_groups], list(lrs.unbind()))

    def step(self) -> None:
        self.current_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"current_step": self.current_step, "groups": [asdict(g) for g in self.groups]}

    def load_state_dict(self, state: dict) -> None:
        self.current_step = state["current_step"]
        self.groups = [_Group(**g) for g in state["groups"]]
        self._constants = None
        self._apply()


def add_param_group(
    optimizer: torch.optim.Optimizer,
    scheduler: GroupedLinearSchedule,
    params: list[torch.nn.Parameter],
    weight_decay: float,
    mode: str,
) -> None:
    """Add freshly created parameters as a new group with their own schedule."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    optimizer.add_param_group({"params": params, "weight_decay": weight_decay, "lr": optimizer.defaults["lr"]})
    scheduler.register_new_group(mode)
