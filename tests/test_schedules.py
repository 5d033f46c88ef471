import pytest
import torch

from triadapt.schedules import GroupedLinearSchedule, add_param_group, linear_factor


def _opt():
    p = torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([p], lr=1.0)


def test_linear_warmup_then_decay_matches_hf_formula():
    assert linear_factor(0, 10, 100) == 0.0
    assert linear_factor(5, 10, 100) == 0.5
    assert linear_factor(10, 10, 100) == 1.0
    assert linear_factor(55, 10, 100) == pytest.approx(0.5)
    assert linear_factor(100, 10, 100) == 0.0


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        # added at step 40 with warmup 10, T = 100: restart re-warms over 10 steps, then decays to 0 at T
        ("restart", {40: 0.0, 45: 0.5, 50: 1.0, 75: 0.5, 100: 0.0}),
        ("global", {40: 60 / 90, 45: 55 / 90, 100: 0.0}),
        ("constant", {40: 1.0, 75: 1.0, 100: 1.0}),
    ],
)
def test_new_group_schedules(mode, expected):
    opt = _opt()
    sched = GroupedLinearSchedule(opt, warmup_steps=10, total_steps=100)
    for _ in range(40):
        sched.step()
    add_param_group(opt, sched, [torch.nn.Parameter(torch.zeros(1))], 0.0, mode)
    seen = {40: opt.param_groups[1]["lr"]}
    for step in range(41, 101):
        sched.step()
        seen[step] = opt.param_groups[1]["lr"]
    for step, factor in expected.items():
        assert seen[step] == pytest.approx(factor), step
    assert opt.param_groups[0]["lr"] == 0.0  # the first group followed the global schedule to 0


def test_state_roundtrip():
    opt = _opt()
    sched = GroupedLinearSchedule(opt, 5, 50)
    for _ in range(7):
        sched.step()
    add_param_group(opt, sched, [torch.nn.Parameter(torch.zeros(1))], 0.0, "restart")
    state = sched.state_dict()
    opt2 = _opt()
    opt2.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0})
    sched2 = GroupedLinearSchedule(opt2, 5, 50)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_unknown_mode_rejected():
    opt = _opt()
    sched = GroupedLinearSchedule(opt, 5, 50)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    with pytest.raises(ValueError, match="restart, global, constant"):
        sched.register_new_group("cosine")


def _adapter_like_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(1, 8), (8, 1), (3,), (2, 8)] * 5]


def _train(optimizer_factory, steps=5):
    """A few AdamW steps on fixed gradients, with a group added half-way (a growth event)."""
    from triadapt.train import clip_gradients

    params = _adapter_like_params()
    grown = [torch.nn.Parameter(torch.ones(4, 8))]
    opt = optimizer_factory([{"params": params, "weight_decay": 0.01}])
    sched = GroupedLinearSchedule(opt, 1, steps)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        if step == 2:
            add_param_group(opt, sched, grown, 0.01, "restart")
        for p in params + (grown if step >= 2 else []):
            p.grad = torch.randn(p.shape, generator=g)
        clip_gradients([p for p in params + grown if p.grad is not None], 1.0)
        opt.step()
        sched.step()
    return opt, [p.detach() for p in params + grown]


def test_build_optimizer_is_fused_adamw_for_every_group_and_agrees_with_foreach():
    from triadapt.train import build_optimizer

    fused_opt, fused = _train(lambda groups: build_optimizer(groups, 1e-2, (0.9, 0.999), 1e-6))
    loop_opt, loop = _train(lambda groups: build_optimizer(groups, 1e-2, (0.9, 0.999), 1e-6, fused=False))
    assert [g["fused"] for g in fused_opt.param_groups] == [True, True]  # the grown group inherits it
    assert [g["foreach"] for g in loop_opt.param_groups] == [True, True]
    assert not any(g["fused"] for g in loop_opt.param_groups)
    for a, b in zip(fused, loop):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)  # the same AdamW, last-bit rounding apart
    plain_opt, plain = _train(lambda groups: torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-6,
                                                                foreach=False))
    assert all(torch.equal(a, b) for a, b in zip(loop, plain))  # foreach is bitwise the per-tensor loop


def test_clip_gradients_equals_torch_per_tensor_clipping():
    from triadapt.train import clip_gradients

    a, b = _adapter_like_params(), _adapter_like_params()
    g = torch.Generator().manual_seed(3)
    for p, q in zip(a, b):
        p.grad = torch.randn(p.shape, generator=g) * 3
        q.grad = p.grad.clone()
    norm = clip_gradients(a, 1.0)
    want = torch.nn.utils.clip_grad_norm_(b, 1.0, foreach=False)
    assert torch.equal(norm, want) and norm > 1.0
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a, b))
    assert torch.equal(clip_gradients(a, 0.0), torch.nn.utils.get_total_norm([p.grad for p in b], foreach=False))
