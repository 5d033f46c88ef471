"""One block per growth event is the per-component layout, stored differently (issue #16).

The former storage (tests/legacy_triadapt_layout.py: four Parameters per rank) and the package's
(one A, B and core block per module and event) run side by side from one seed through a run with
several growth events, in fp32 on the CPU: the same outputs, gradients, allocation decisions,
parameters and Adam state at every step. The clipping norm is summed in one order for both, so
the runs agree to the last bit; the tolerance only allows for float rounding.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from legacy_triadapt_layout import LegacyTriAdaptLoRA, LegacyTriangularCore
from omegaconf import OmegaConf
from test_triadapt import CONF, D, Stack

from triadapt.errors import ConfigError
from triadapt.methods.base import RunContext
from triadapt.methods.core import TriangularCore, adapted_layers
from triadapt.methods.triadapt import TriAdaptLoRA
from triadapt.schedules import GroupedLinearSchedule

STEPS = 40
TOL = {"rtol": 1e-6, "atol": 1e-9}


def build(cls, **overrides):
    cfg = OmegaConf.load(CONF)
    cfg.target_rank = 4
    cfg.update({"init_warmup": 4, "incre_interval": 4, "dropout": 0.1, "orth_reg_weight": 0.1} | overrides)
    method = cls(cfg, RunContext(total_steps=STEPS, target_modules=["query", "value"], learning_rate=1e-2, seed=3))
    torch.manual_seed(123)
    model = Stack()
    optimizer = torch.optim.AdamW(method.inject(model), lr=1e-2, weight_decay=0.01)
    scheduler = GroupedLinearSchedule(optimizer, warmup_steps=3, total_steps=STEPS)
    return method, model, optimizer, scheduler


def dense(layer, grad: bool = False) -> dict[str, torch.Tensor]:
    """A, B and the core's L and U (values or gradients) as dense matrices, whatever the storage."""
    def val(p):
        return (p.grad if p.grad is not None else torch.zeros_like(p)) if grad else p.detach()

    a = torch.cat([val(p) for p in layer.lora_A])
    b = torch.cat([val(p) for p in layer.lora_B], dim=1)
    core, r = layer.core, layer.rank
    lower, upper = torch.zeros(r, r), torch.zeros(r, r)
    if isinstance(core, LegacyTriangularCore):
        r0 = 0
        for rows, cols in zip(core.rows, core.cols):
            r1 = rows.shape[1]
            lower[r0:r1, :r1], upper[:r1, r0:r1] = val(rows), val(cols)
            r0 = r1
    elif isinstance(core, TriangularCore):
        flat = torch.cat([val(p) for p in core.blocks])
        pos = core._positions(flat.device)
        half = torch.cat([torch.arange(core.block_numel(*s)) < core.block_numel(*s) // 2 for s in core.spans])
        lower.view(-1)[pos[half]] = flat[half]
        upper.view(-1)[pos[~half]] = flat[~half]
    else:  # diagonal core
        lower = torch.diag(torch.cat([val(p) for p in core.values]))
    return {"A": a, "B": b, "L": lower, "U": upper}


def adam_state(layer, optimizer) -> dict[str, torch.Tensor]:
    """exp_avg and exp_avg_sq mapped onto the dense layout through a parameter swap."""
    out = {}
    for key in ("exp_avg", "exp_avg_sq"):
        saved = [(p, p.data) for p in layer.parameters() if p.requires_grad]
        for p, _ in saved:
            p.data = optimizer.state[p][key] if p in optimizer.state else torch.zeros_like(p)
        out |= {f"{key}.{k}": v.clone() for k, v in dense(layer).items()}
        for p, data in saved:
            p.data = data
    return out


def step(run, t, batch):
    method, model, optimizer, scheduler = run
    x, y = batch
    loss = F.mse_loss(model(x), y) + method.extra_loss(model)
    loss.backward()
    grads = {name: dense(layer, grad=True) for name, layer in adapted_layers(model)}
    # Clipping at norm 1 with the norm summed in one order for both layouts (foreach clipping sums
    # per-tensor norms, so its rounding depends on how the entries are split into tensors).
    norm = torch.stack([g.pow(2).sum() for d in grads.values() for g in d.values()]).sum().sqrt()
    coef = torch.clamp(1.0 / (norm + 1e-6), max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(coef)
    grads = {name: dense(layer, grad=True) for name, layer in adapted_layers(model)}
    method.before_step(t, model, optimizer, scheduler)
    optimizer.step()
    scheduler.step()
    method.after_step(t, model, optimizer, scheduler)
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for k, w in want.items():
        torch.testing.assert_close(got[k], w, **TOL, msg=lambda m, k=k: f"{what} {k}: {m}")


@pytest.mark.parametrize(
    "overrides",
    [
        {"init": "single", "incre_rank_num": 2},
        {"init": "single", "init_rank": 2, "incre_rank_num": 3, "growth": "exponential"},
        {"init": "block_c0", "incre_rank_num": 2},
        {"init": "single", "core": "diagonal", "incre_rank_num": 2},
    ],
    ids=["single", "single-init2-exp", "block_c0", "diagonal"],
)
def test_block_layout_runs_as_the_per_component_layout(overrides):
    old, new = build(LegacyTriAdaptLoRA, **overrides), build(TriAdaptLoRA, **overrides)
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(4, 3, D, generator=g), torch.randn(4, 3, D, generator=g)) for _ in range(5)]
    for t in range(STEPS):
        torch.manual_seed(1000 + t)  # the same dropout masks in both runs
        loss_old, grads_old = step(old, t, batches[t % 5])
        torch.manual_seed(1000 + t)
        loss_new, grads_new = step(new, t, batches[t % 5])
        torch.testing.assert_close(loss_new, loss_old, **TOL)
        assert new[0].history == old[0].history  # the same allocation decisions, thresholds included
        for (name, l_new), (_, l_old) in zip(adapted_layers(new[1]), adapted_layers(old[1])):
            assert l_new.rank == l_old.rank and l_new.scale == l_old.scale
            assert l_new.core.n_components == l_old.core.n_components  # the score's n_k
            assert_same(grads_new[name], grads_old[name], f"step {t} grad {name}")
            assert_same(dense(l_new), dense(l_old), f"step {t} param {name}")
            assert_same(adam_state(l_new, new[2]), adam_state(l_old, old[2]), f"step {t} adam {name}")
    events = old[0].history
    assert len(events) >= 3 and old[0].total_rank == old[0].target_total  # several events, target reached
    ranks = [layer.rank for _, layer in adapted_layers(new[1])]
    assert len(set(ranks)) > 1  # heterogeneous ranks: blocks of different sizes were exercised
    # Tensors grow with events, not with rank: three per module for its initial block and each event it grew in.
    for name, layer in adapted_layers(new[1]):
        grown = sum(name in e["selected"] for e in events)
        assert len(list(layer.parameters())) == 2 + 3 * (1 + grown)  # + the frozen base weight and bias
    assert sum(p.numel() for p in new[1].parameters()) == sum(p.numel() for p in old[1].parameters())
    assert len(new[2].param_groups) == len(old[2].param_groups) == 1 + len(events)


def test_single_block_holds_the_triangles_only():
    _, model, *_ = build(TriAdaptLoRA, init="single", init_rank=3)
    core = dict(adapted_layers(model))["layers.0.query"].core
    (block,) = core.blocks
    assert block.shape == (3 * 4,)  # r(r+1): 1+2+3 entries of L, 1+2+3 of U
    assert torch.count_nonzero(torch.triu(core.lower(), 1)) == 0 and torch.count_nonzero(torch.tril(core.upper(), -1)) == 0


def test_old_layout_checkpoint_is_refused_in_one_line():
    old = build(LegacyTriAdaptLoRA, incre_rank_num=2)
    state = old[0].state_dict()
    state.pop("layout")  # what the former version wrote
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    new = build(TriAdaptLoRA, incre_rank_num=2)
    with pytest.raises(ConfigError, match="one tensor per rank") as err:
        new[0].load_state_dict(torch.load(buf, weights_only=True), new[1], new[2], new[3])
    assert "\n" not in str(err.value)
