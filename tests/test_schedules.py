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
