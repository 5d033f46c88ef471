"""IncreLoRA (methods.md §3): score, EMAs, growth, restart warmup, budget, validation, resume, presets."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from triadapt.errors import ConfigError
from triadapt.methods.base import RunContext
from triadapt.methods.core import adapted_layers
from triadapt.methods.increlora import IncreLoRA
from triadapt.schedules import GroupedLinearSchedule

CONF = Path(__file__).resolve().parents[1] / "conf"
TARGETS = ["query", "key", "value", "dense"]
LR, WARMUP, WD = 1e-2, 5, 0.01


class Tiny(nn.Module):
    """Four adaptable linears of different shapes plus a trainable head."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.query, self.key = nn.Linear(d, d), nn.Linear(d, d)
        self.value, self.dense = nn.Linear(d, 6), nn.Linear(6, d)
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        h = torch.tanh(self.query(x)) + torch.tanh(self.key(x))
        return self.head(torch.tanh(self.dense(torch.tanh(self.value(h)))))


def make_cfg(**over):
    cfg = OmegaConf.load(CONF / "method" / "increlora.yaml")
    cfg.target_rank = 2  # stands in for ${budget.rank}
    return OmegaConf.merge(cfg, over)


def build(total_steps=60, seed=0, **over):
    torch.manual_seed(seed)
    model = Tiny()
    ctx = RunContext(total_steps=total_steps, target_modules=TARGETS, learning_rate=LR, weight_decay=WD,
                     warmup_steps=WARMUP, seed=seed)
    method = IncreLoRA(make_cfg(**over), ctx)
    groups = method.inject(model)
    model.head.requires_grad_(True)
    groups.append({"params": list(model.head.parameters()), "weight_decay": WD})
    optimizer = torch.optim.AdamW(groups, lr=LR)
    return model, method, optimizer, GroupedLinearSchedule(optimizer, WARMUP, total_steps)


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(4, 3, 8, generator=g), torch.randn(4, 3, 1, generator=g)


def backward(model, method, step):
    x, y = batch(step)
    loss = F.mse_loss(model(x), y)
    reg = method.extra_loss(model)
    (loss if reg is None else loss + reg).backward()


def train(model, method, opt, sched, start, stop):
    """The loop's hook order (triadapt/methods/base.py)."""
    for step in range(start, stop):
        backward(model, method, step)
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        method.before_step(step, model, opt, sched)
        opt.step()
        sched.step()
        method.after_step(step, model, opt, sched)
        opt.zero_grad(set_to_none=True)


def layers(model):
    return dict(adapted_layers(model))


def test_score_equals_materialised_delta_w_times_its_gradient():
    model, method, _, _ = build(dropout=0.3)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.core.values[0].normal_()
    x, _ = batch(0)
    with torch.no_grad():  # evaluation passes leave the scores alone
        model(x)
    assert method.raw == {}
    torch.manual_seed(7)
    (model(x) ** 2).sum().backward()

    # The same forward with ΔW materialised as a leaf, the same dropout masks (same RNG order).
    q, k, v, d = (layers(model)[n] for n in TARGETS)
    dw = {n: layers(model)[n].delta_weight().detach().requires_grad_(True) for n in TARGETS}

    def adapted(layer, name, inp):
        return layer.base(inp) + F.dropout(inp, 0.3, training=True) @ dw[name].T

    torch.manual_seed(7)
    h = torch.tanh(adapted(q, "query", x)) + torch.tanh(adapted(k, "key", x))
    h = torch.tanh(adapted(v, "value", h))
    (model.head(torch.tanh(adapted(d, "dense", h))) ** 2).sum().backward()
    for name in TARGETS:
        expected = (dw[name] * dw[name].grad).abs().sum() / math.sqrt(dw[name].numel())
        assert expected > 0
        torch.testing.assert_close(method.raw[name], expected, rtol=1e-5, atol=0)


def test_ema_follows_the_formula():
    model, method, opt, sched = build(init_warmup=50, incre_interval=5)
    s1 = {"query": 1.0, "key": 2.0, "value": 0.5, "dense": 4.0}
    s2 = {"query": 3.0, "key": 0.0, "value": 0.5, "dense": 1.0}
    for step, s in enumerate((s1, s2)):
        backward(model, method, step)
        method.raw = {n: torch.tensor(v) for n, v in s.items()}
        method.before_step(step, model, opt, sched)
        opt.zero_grad()
    for i, n in enumerate(TARGETS):
        i1 = 0.15 * s1[n]
        u1 = 0.15 * abs(s1[n] - i1)
        i2 = 0.85 * i1 + 0.15 * s2[n]
        u2 = 0.85 * u1 + 0.15 * abs(s2[n] - i2)
        assert method.ema_ipt[i].item() == pytest.approx(i2, rel=1e-6)
        assert method.ema_unc[i].item() == pytest.approx(u2, rel=1e-6)
        assert method.scores()[n] == pytest.approx(i2 * u2, rel=1e-5)


def grow_with_scores(step, raw, **over):
    """Train up to ``step``, then run its growth with hand-set raw scores."""
    model, method, opt, sched = build(**over)
    train(model, method, opt, sched, 0, step)
    backward(model, method, step)
    method.raw = {n: torch.tensor(v) for n, v in raw.items()}
    method.ema_ipt = method.ema_unc = None  # one update: score = 0.15·s · 0.15·0.85·s, ordered like s
    before = {
        "params": [(p, p.detach().clone()) for p in model.parameters()],
        "adam": {p: {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()},
        "dw": {n: layer.delta_weight().detach().clone() for n, layer in adapted_layers(model)},
        "n_groups": len(opt.param_groups),
    }
    method.before_step(step, model, opt, sched)
    return model, method, opt, sched, before


def grown_at_step_4():
    """Δr = 2 (target_rank 4), top_h 2, first growth at step 4 with scores key > dense > value > query."""
    raw = {"query": 0.1, "key": 3.0, "value": 0.5, "dense": 2.0}
    return grow_with_scores(4, raw, target_rank=4, top_h=2, init_warmup=2, incre_interval=2)


def test_growth_grows_top_h_and_leaves_existing_state_alone():
    model, method, opt, sched, before = grown_at_step_4()
    event = method.history[-1]
    assert event["step"] == 4 and event["selected"] == ["key", "dense"] and event["total_rank"] == 4 + 2 * 2
    assert event["threshold"] == pytest.approx(method.scores()["dense"])
    assert method.ranks(model) == {"query": 1, "key": 3, "value": 1, "dense": 3}
    for name, layer in adapted_layers(model):
        # init block + first reserve (+ a fresh reserve when grown)
        assert len(layer.lora_A) == len(layer.core.values) == (3 if name in ("key", "dense") else 2)
    # Existing Parameters: same objects, same values, same Adam state.
    params = list(model.parameters())
    for p, value in before["params"]:
        assert any(p is q for q in params) and torch.equal(p, value)
    for p, st in before["adam"].items():
        assert all(torch.equal(opt.state[p][k], v) for k, v in st.items())
    # One new group: the activated reserve λ and the new reserve's a, b of each grown module.
    assert len(opt.param_groups) == before["n_groups"] + 1
    new = opt.param_groups[-1]["params"]
    expected = []
    for name in ("key", "dense"):
        layer = layers(model)[name]
        activated, fresh = layer.core.values[1], layer.core.values[2]
        assert activated.requires_grad and torch.equal(activated, torch.full((2,), 1e-5))
        assert not fresh.requires_grad and torch.equal(fresh, torch.full((2,), 1e-5))
        assert layer.lora_A[2].shape == (2, layer.in_features) and layer.lora_B[2].shape == (layer.out_features, 2)
        assert layer.scale == pytest.approx(32 / (3 + 1e-5), rel=1e-12)
        expected += [activated, layer.lora_A[2], layer.lora_B[2]]
    assert [id(p) for p in new] == [id(p) for p in expected]
    assert layers(model)["query"].scale == pytest.approx(32 / (1 + 1e-5), rel=1e-12)


def test_delta_w_after_activation_is_the_rescaled_old_one_plus_the_new_reserve():
    # The activated λ keeps its 1e-5, so B·diag(λ)·A is unchanged except for the fresh reserve's
    # term; ΔW itself is rescaled because α/r_t now divides by r_t + Δr.
    model, method, opt, sched, before = grown_at_step_4()
    for name, layer in adapted_layers(model):
        old = before["dw"][name]
        if name in ("query", "value"):
            assert torch.equal(layer.delta_weight(), old)
            continue
        reserve = layer.lora_B[2] @ torch.diag(layer.core.values[2]) @ layer.lora_A[2]
        expected = old * (1 + 1e-5) / (3 + 1e-5) + 32 / (3 + 1e-5) * reserve
        torch.testing.assert_close(layer.delta_weight(), expected, rtol=1e-6, atol=1e-9)


def test_new_group_restarts_warmup():
    model, method, opt, sched, _ = grown_at_step_4()
    grown, reserve0, first = opt.param_groups[-1], opt.param_groups[2], opt.param_groups[0]
    assert grown["lr"] == 0.0  # inserted at step 4: warms up again from 0
    for k in range(1, 31):
        sched.step()
        if k in (1, 3, 5, 30):
            expected = {1: 0.2, 3: 0.6, 5: 1.0, 30: 26 / 51}[k]  # warmup 5, then decay to 0 at T = 60
            assert grown["lr"] == pytest.approx(LR * expected)
    # Groups from step 0 (the initial adapter, the first reserve) follow the global schedule.
    assert first["lr"] == pytest.approx(LR * (60 - 34) / 55)
    assert reserve0["lr"] == pytest.approx(LR * (60 - 34) / 55)


def test_advance_learn_off_keeps_reserve_frozen_until_activation():
    model, method, opt, sched = build(target_rank=4, top_h=2, init_warmup=2, incre_interval=2, advance_learn=False)
    train(model, method, opt, sched, 0, 5)
    for name, layer in adapted_layers(model):
        grown = method.ranks(model)[name] == 3
        assert layer.lora_A[1].requires_grad == grown and layer.core.values[1].requires_grad == grown
        assert not layer.lora_A[-1].requires_grad and torch.equal(layer.core.values[-1], torch.zeros(2))


@pytest.mark.parametrize("overshoot", ["clamp", "allow"])
def test_total_rank_lands_on_target_with_clamp(overshoot):
    # Δr = 2, R* = 10 from 4: the second event has room for one module; the reference rule grows two.
    model, method, opt, sched = build(total_steps=20, target_total_rank=10, incre_rank_num=2, top_h=2,
                                      init_warmup=1, incre_interval=1, overshoot=overshoot)
    train(model, method, opt, sched, 0, 20)
    report = method.report(model)
    assert [e["total_rank"] for e in method.history] == ([8, 10] if overshoot == "clamp" else [8, 12])
    assert report["overshoot"] == (0 if overshoot == "clamp" else 2)
    assert method.finished and method._handles == []  # scoring stopped
    reserve_lambda = 0.0 if overshoot == "clamp" else 1e-5  # the reference code zeroes it only on an exact hit
    for _, layer in adapted_layers(model):
        assert torch.equal(layer.core.values[-1], torch.full((2,), reserve_lambda))
    # Budget accounting excludes the reserve.
    ranks = method.ranks(model)
    assert sum(ranks.values()) == report["total_rank"]
    expected = sum(ranks[n] * (l.in_features + l.out_features + 1) for n, l in adapted_layers(model))
    assert method.adapter_params(model) == report["adapter_params"] == expected
    everything = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n or ".core." in n)
    assert everything == expected + sum(2 * (l.in_features + l.out_features + 1) for l in layers(model).values())


@pytest.mark.parametrize("overshoot", ["clamp", "allow"])
def test_ties_beyond_the_budget_are_cut_by_name_order_with_clamp(overshoot):
    # R* = 6 from 4 with Δr = 2: one module fits; all four tie at the threshold.
    tie = dict.fromkeys(TARGETS, 1.0)
    model, method, *_ = grow_with_scores(2, tie, total_steps=20, target_total_rank=6, incre_rank_num=2, top_h=2,
                                         init_warmup=1, incre_interval=1, overshoot=overshoot)
    assert method.history[-1]["selected"] == (["query"] if overshoot == "clamp" else TARGETS)
    assert method.total == (6 if overshoot == "clamp" else 12)


def test_default_schedule_reaches_the_target_in_a_60_step_run():
    model, method, opt, sched = build(target_rank=8)  # fractions of the run, top_h chosen automatically
    train(model, method, opt, sched, 0, 60)
    assert method.total == 8 * 4 and method.history[-1]["step"] < 60
    assert set(method.ranks(model).values()) <= {1, 5, 9, 13, 17, 21, 25, 29}


@pytest.mark.parametrize(
    "over, match",
    [
        ({"target_total_rank": 0}, "target rank must be > 0"),
        ({"target_rank": 0}, "target rank must be > 0"),
        ({"incre_interval": 0}, "incre_interval=0 must be > 0"),
        ({"incre_interval": 0.0}, "incre_interval=0.0 must be > 0"),
        ({"target_rank": 8, "top_h": 1, "init_warmup": 10, "incre_interval": 10}, "growth needs 7 events"),
        ({"target_total_rank": 9, "incre_rank_num": 2}, "not a multiple of incre_rank_num"),
        ({"overshoot": "cap"}, "overshoot"),
    ],
)
def test_validation_errors(over, match):
    with pytest.raises(ConfigError, match=match) as err:
        build(**over)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("stop_at", [9, 19])  # in the middle of growth; after the target was met
def test_resume_continues_bit_identically(stop_at):
    kwargs = dict(total_steps=24, target_rank=4, top_h=1, init_warmup=2, incre_interval=2, dropout=0.1)
    model, method, opt, sched = build(**kwargs)
    train(model, method, opt, sched, 0, 24)
    assert method.total == 16 and method.history[-1]["step"] == 14

    model2, method2, opt2, sched2 = build(**kwargs)
    train(model2, method2, opt2, sched2, 0, stop_at)
    buf = io.BytesIO()
    torch.save({"method": method2.state_dict(), "model": model2.state_dict(), "optimizer": opt2.state_dict(),
                "scheduler": sched2.state_dict(), "rng": torch.get_rng_state()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)

    model3, method3, opt3, sched3 = build(seed=0, **kwargs)
    torch.manual_seed(123)  # a different global RNG: the checkpoint's must take over
    method3.load_state_dict(ckpt["method"], model3, opt3, sched3)
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["optimizer"])
    sched3.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"])
    train(model3, method3, opt3, sched3, stop_at, 24)

    assert method3.history == method.history and method3.ranks(model3) == method.ranks(model)
    assert torch.equal(method3.ema_ipt, method.ema_ipt) and torch.equal(method3.ema_unc, method.ema_unc)
    a, b = dict(model.named_parameters()), dict(model3.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert a[name].requires_grad == b[name].requires_grad, name


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def test_paper_presets_compose():
    cfg = compose(["method=increlora", "task=glue/rte", "budget=r2"])
    assert cfg.train.lr == 1.2e-3 and cfg.train.epochs == 50 and cfg.train.warmup_steps == 100
    assert cfg.train.warmup_ratio is None and cfg.train.weight_decay == 0.01 and cfg.train.eval_every == 100
    assert cfg.task.max_seq_length == 320 and cfg.model.classifier_dropout == 0.2
    m = cfg.method
    assert (m.top_h, m.incre_rank_num, m.init_warmup, m.incre_interval, m.orth_reg_weight) == (5, 1, 100, 100, 0.3)
    assert (m.alpha, m.dropout, m.target_rank) == (32, 0.0, 2)

    cfg = compose(["method=lora", "task=glue/mrpc", "budget=r8"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size, cfg.train.weight_decay) == (1e-3, 30, 32, 0.01)
    assert cfg.task.max_seq_length == 320 and cfg.model.classifier_dropout == 0.0
    assert (cfg.method.r, cfg.method.alpha, cfg.method.dropout) == (8, 32, 0.3)

    cfg = compose(["method=increlora", "task=glue/stsb", "budget=r8"])  # [MISSING]: rank-2 values reused
    assert (cfg.train.lr, cfg.method.top_h, cfg.method.incre_rank_num, cfg.method.target_rank) == (2.2e-3, 4, 4, 8)

    cfg = compose(["method=increlora", "task=glue/rte", "budget=r2", "hparams=none"])
    assert cfg.method.top_h is None and cfg.train.lr == 5e-4
