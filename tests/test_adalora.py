"""AdaLoRA (native and through peft): schedule, importance, masking, peft equivalence, resume, presets."""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from triadapt.errors import ConfigError  # noqa: E402
from triadapt.methods.adalora import BudgetSchedule  # noqa: E402
from triadapt.methods.base import RunContext, build_method  # noqa: E402
from triadapt.methods.core import adapted_layers  # noqa: E402
from triadapt.schedules import GroupedLinearSchedule  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
TARGETS = ["query", "value", "ffn", "out"]
GLUE = ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(8, 8)
        self.value = nn.Linear(8, 8)
        self.ffn = nn.Linear(8, 16)  # d_in ≠ d_out: catches P/Q orientation mistakes
        self.out = nn.Linear(16, 8)

    def forward(self, x):
        x = torch.tanh(self.value(torch.tanh(self.query(x)))) + x
        return self.out(torch.tanh(self.ffn(x))) + x


class Tiny(nn.Module):
    """8 adapted modules over 2 blocks, plus a head that is not adapted."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList([Block() for _ in range(2)])
        self.classifier = nn.Linear(8, 2)

    def forward(self, x, labels=None):
        for block in self.layer:
            x = block(x)
        logits = self.classifier(x)
        return logits if labels is None else SimpleNamespace(loss=F.cross_entropy(logits, labels), logits=logits)


def method_cfg(name="adalora", **overrides):
    cfg = OmegaConf.load(CONF / "method" / "adalora.yaml")
    cfg.merge_with({"name": name, "target_rank": 2, "init_rank": 4, **overrides})
    return cfg


def build(name="adalora", total_steps=20, seed=0, **overrides):
    """Model, method, optimizer and scheduler wired like the experiment does it."""
    torch.manual_seed(seed)
    model = Tiny()
    method = build_method(
        method_cfg(name, **overrides), RunContext(total_steps=total_steps, target_modules=TARGETS, weight_decay=0.01)
    )
    groups = method.inject(model)
    model.classifier.requires_grad_(True)
    groups.append({"params": list(model.classifier.parameters()), "weight_decay": 0.01})
    optimizer = torch.optim.AdamW(groups, lr=2e-2)
    return model, method, optimizer, GroupedLinearSchedule(optimizer, 2, total_steps)


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 8, generator=g).to(torch.get_default_dtype()), torch.randint(0, 2, (16,), generator=g)


def train_step(step, model, method, optimizer, scheduler):
    """One step in the hook order documented in triadapt/methods/base.py."""
    x, y = batch(step)
    loss = F.cross_entropy(model(x), y)
    reg = method.extra_loss(model)
    (loss if reg is None else loss + reg).backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    method.before_step(step, model, optimizer, scheduler)
    optimizer.step()
    scheduler.step()
    method.after_step(step, model, optimizer, scheduler)
    optimizer.zero_grad(set_to_none=True)


def lambdas(method):
    return {name: layer.core.values[0] for name, layer in method.layers}


def set_scores(method, values):
    """EMAs under which triplet i of a module scores 3·f(values[i]), f increasing (Ū = 1, all entries Ī = v_i)."""
    for name, layer in method.layers:
        v = values[name]
        q, p = layer.lora_A[0], layer.lora_B[0]
        method.ema_ipt[name] = [v[:, None].expand_as(q).clone(), v[None, :].expand_as(p).clone(), v.clone()]
        method.ema_unc[name] = [torch.ones_like(t) for t in method.ema_ipt[name]]


def zero_grads(method):
    for _, layer in method.layers:
        for p in method._triplet_params(layer):
            p.grad = torch.zeros_like(p)


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# -- budget schedule -----------------------------------------------------------------------


def test_budget_schedule_matches_formula_and_peft():
    from peft.tuners.adalora.layer import RankAllocator

    T, ti, tf, dT, b0, bT = 100, 10, 20, 5, 24, 12
    sched = BudgetSchedule(T, ti, tf, dT)

    def formula(t):  # §2.3 with the code's numerator (t − t_i)
        return int(bT + (b0 - bT) * (1 - (t - ti) / (T - ti - tf)) ** 3)

    assert sched(0, b0, bT) == (b0, False)
    assert sched(ti, b0, bT) == (b0, False)  # last warm-up step: no masking
    assert sched(ti + 1, b0, bT) == (formula(ti + 1), False)  # 11 is not a multiple of ΔT
    assert formula(ti + 1) < b0
    assert sched(15, b0, bT) == (formula(15), True)
    assert sched(45, b0, bT) == (formula(45), True)
    assert sched(T - tf, b0, bT) == (bT, True)  # budgeting ends exactly at b(T)
    assert sched(T - tf + 1, b0, bT) == (bT, True)
    assert sched(T - 1, b0, bT) == (bT, True)

    fake = SimpleNamespace(
        peft_config=SimpleNamespace(tinit=ti, tfinal=tf, total_step=T, deltaT=dT), init_bgt=b0, target_bgt=bT
    )
    assert [sched(t, b0, bT) for t in range(T)] == [RankAllocator.budget_schedule(fake, t) for t in range(T)]


def test_default_fractions_reach_target_budget_in_60_steps():
    model, method, opt, sched = build(total_steps=60, init_rank=None)  # init_rank → ceil(1.5·2) = 3
    assert (method.schedule.tinit, method.schedule.tfinal, method.schedule.delta_t) == (6, 12, 1)
    assert (method.init_budget, method.target_budget) == (24, 16)
    for step in range(60):
        train_step(step, model, method, opt, sched)
    ranks = method.ranks(model)
    assert sum(ranks.values()) == 16 and max(ranks.values()) <= 3
    assert method.metrics()["total_rank"] == 16 and method.metrics()["budget"] == 16
    layers = dict(adapted_layers(model))
    effective = sum(r * (layers[n].in_features + layers[n].out_features + 1) for n, r in ranks.items())
    assert method.adapter_params(model) == effective
    report = method.report(model)
    assert report["target_rank"] == 2.0 and report["ranks"] == ranks
    history = report["history"]
    assert history[0]["step"] > 6 and history[-1]["step"] == 48 and history[-1]["budget"] == 16
    assert history[-1]["ranks"] == ranks
    budgets = [e["budget"] for e in history]
    assert budgets == sorted(budgets, reverse=True)
    assert all(sum(e["ranks"].values()) == e["budget"] for e in history)


# -- importance and masking ----------------------------------------------------------------


def test_importance_follows_the_ema_formulas():
    model, method, opt, sched = build(total_steps=20, tinit=5, tfinal=5, deltaT=1, beta1=0.7, beta2=0.6)
    with torch.no_grad():
        for lam in lambdas(method).values():
            lam.normal_()
    ema_i, ema_u = {}, {}
    for step in range(2):
        x, y = batch(step)
        (F.cross_entropy(model(x), y) + method.extra_loss(model)).backward()
        opt.step()
        sched.step()
        for name, layer in method.layers:
            for k, p in enumerate(method._triplet_params(layer)):
                ipt = (p.detach() * p.grad).abs()  # post-step weight × this step's gradient
                i_prev, u_prev = ema_i.get((name, k), 0.0), ema_u.get((name, k), 0.0)
                ema_i[name, k] = 0.7 * i_prev + 0.3 * ipt
                ema_u[name, k] = 0.6 * u_prev + 0.4 * (ipt - ema_i[name, k]).abs()
        method.after_step(step, model, opt, sched)
        opt.zero_grad(set_to_none=True)
        for name, _ in method.layers:
            for k in range(3):
                torch.testing.assert_close(method.ema_ipt[name][k], ema_i[name, k], rtol=1e-6, atol=1e-12)
                torch.testing.assert_close(method.ema_unc[name][k], ema_u[name, k], rtol=1e-6, atol=1e-12)
    scores = method.triplet_scores()
    for name, layer in method.layers:
        s_q, s_p, s_l = (ema_i[name, k] * ema_u[name, k] for k in range(3))
        expected = torch.tensor([s_l[i] + s_p[:, i].mean() + s_q[i, :].mean() for i in range(4)])
        torch.testing.assert_close(scores[name], expected)


def test_masking_keeps_exactly_the_budget_and_freezes_in_final_phase():
    T = 30
    model, method, opt, sched = build(total_steps=T, tinit=2, tfinal=6, deltaT=3)
    gen = torch.Generator().manual_seed(3)
    set_scores(method, {n: torch.rand(4, generator=gen) for n, _ in method.layers})  # distinct: no ties
    b0, bT = method.init_budget, method.target_budget

    def reset_lambdas():
        with torch.no_grad():
            for lam in lambdas(method).values():
                lam.fill_(1.0)

    for step in (4, 6, 12, 24):  # 4: no allocation (4 mod 3 ≠ 0); 24 = T − t_f: forced, frozen
        reset_lambdas()
        zero_grads(method)
        method.after_step(step, model, opt, sched)
        budget, mask_now = method.schedule(step, b0, bT)
        active = torch.cat([lam != 0 for lam in lambdas(method).values()])
        scores = torch.cat(list(method.triplet_scores().values()))
        if not (mask_now or step == 24):
            assert bool(active.all())
            continue
        assert int(active.sum()) == budget < b0
        # The masked ones are exactly the lowest-scoring triplets, across modules.
        assert set(torch.argsort(scores)[: b0 - budget].tolist()) == set((~active).nonzero().view(-1).tolist())
    assert budget == bT and method.history[-1]["step"] == 24

    frozen = {n: lam != 0 for n, lam in lambdas(method).items()}
    set_scores(method, {n: torch.rand(4, generator=gen) for n, _ in method.layers})  # would pick others
    ema = copy.deepcopy(method.ema_ipt)
    reset_lambdas()
    zero_grads(method)
    method.after_step(25, model, opt, sched)
    assert all(torch.equal(lam != 0, frozen[n]) for n, lam in lambdas(method).items())
    assert all(torch.equal(a, b) for n in ema for a, b in zip(ema[n], method.ema_ipt[n]))  # no update in final phase


def test_masked_triplets_keep_training_and_can_come_back():
    model, method, opt, sched = build(total_steps=40, tinit=2, tfinal=6, deltaT=5, orth_reg_weight=0.1)
    first, layer0 = method.layers[0]
    with torch.no_grad():
        for lam in lambdas(method).values():
            lam.fill_(1.0)
    scores = {n: torch.linspace(1.0, 2.0, 4) + 1.5 * j for j, (n, _) in enumerate(method.layers)}
    scores[first] = torch.tensor([0.01, 5.0, 5.0, 5.0])  # triplet 0 of the first module is the least important
    set_scores(method, scores)
    zero_grads(method)
    method.after_step(5, model, opt, sched)
    assert layer0.core.values[0][0] == 0

    x, y = batch(0)
    (F.cross_entropy(model(x), y) + method.extra_loss(model)).backward()
    assert layer0.core.values[0].grad[0] != 0  # λ_i still gets a gradient
    assert layer0.lora_A[0].grad[0].abs().sum() > 0  # Q row and P column too (regulariser)
    assert layer0.lora_B[0].grad[:, 0].abs().sum() > 0
    q_row, p_col = layer0.lora_A[0][0].detach().clone(), layer0.lora_B[0][:, 0].detach().clone()
    sched.step()  # past the first warm-up step, where the lr is 0
    opt.step()
    assert not torch.equal(layer0.lora_A[0][0], q_row) and not torch.equal(layer0.lora_B[0][:, 0], p_col)
    assert layer0.core.values[0][0] != 0  # revived until the next allocation
    opt.zero_grad(set_to_none=True)

    scores[first] = torch.tensor([100.0, 0.01, 5.0, 5.0])  # now the most important one
    set_scores(method, scores)
    zero_grads(method)
    method.after_step(10, model, opt, sched)
    assert layer0.core.values[0][0] != 0 and layer0.core.values[0][1] == 0


def test_orthogonal_regulariser_by_hand():
    model, method, _, _ = build(orth_reg_weight=0.3)
    norms = []
    for _, layer in method.layers:
        a, b = layer.lora_A[0].tolist(), layer.lora_B[0].tolist()  # r × d_in, d_out × r
        r = len(a)
        gram_a = [[sum(x * y for x, y in zip(a[i], a[j])) - (i == j) for j in range(r)] for i in range(r)]
        gram_b = [[sum(row[i] * row[j] for row in b) - (i == j) for j in range(r)] for i in range(r)]
        norms += [sum(v**2 for row in gram_a for v in row) ** 0.5, sum(v**2 for row in gram_b for v in row) ** 0.5]
    expected = 0.3 * sum(norms) / len(norms)  # mean of unsquared Frobenius norms, times γ
    assert method.extra_loss(model).item() == pytest.approx(expected, rel=1e-5)
    model, method, _, _ = build(orth_reg_weight=0.0)
    assert method.extra_loss(model) is None


# -- equivalence with peft -----------------------------------------------------------------


def test_native_matches_peft(float64):
    T = 24
    kw = dict(total_steps=T, tinit=4, tfinal=6, deltaT=3, orth_reg_weight=0.1)
    m_nat, nat, opt_nat, sch_nat = build("adalora", **kw)
    m_peft, peft, opt_peft, sch_peft = build("peft_adalora", **kw)
    assert type(m_peft) is Tiny  # adapted in place, no wrapper; both share the same seeded base weights
    with torch.no_grad():
        for name, layer in adapted_layers(m_nat):
            svd = m_peft.get_submodule(name)
            svd.lora_E["default"].normal_()  # non-zero λ so that the forward check means something
            layer.lora_A[0].copy_(svd.lora_A["default"])
            layer.lora_B[0].copy_(svd.lora_B["default"])
            layer.core.values[0].copy_(svd.lora_E["default"].view(-1))

    x, y = batch(0)
    out_nat, out_peft = m_nat(x), m_peft(x)
    assert all(layer.delta_weight().abs().sum() > 0 for _, layer in adapted_layers(m_nat))
    torch.testing.assert_close(out_nat, out_peft, rtol=0, atol=1e-6)
    reg_nat, reg_peft = nat.extra_loss(m_nat), peft.extra_loss(m_peft)
    torch.testing.assert_close(reg_nat, reg_peft, rtol=0, atol=1e-6)
    # peft's own forward adds the same regulariser to the loss.
    torch.testing.assert_close(peft.tuner(x, labels=y).loss - m_peft(x, labels=y).loss, reg_peft, rtol=0, atol=1e-10)
    (F.cross_entropy(out_nat, y) + reg_nat).backward()
    (F.cross_entropy(out_peft, y) + reg_peft).backward()
    for name, layer in adapted_layers(m_nat):
        svd = m_peft.get_submodule(name)
        torch.testing.assert_close(layer.lora_A[0].grad, svd.lora_A["default"].grad, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.lora_B[0].grad, svd.lora_B["default"].grad, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.core.values[0].grad, svd.lora_E["default"].grad.view(-1), rtol=0, atol=1e-6)
    opt_nat.zero_grad(set_to_none=True)
    opt_peft.zero_grad(set_to_none=True)

    probe, _ = batch(-1)
    for step in range(T):
        train_step(step, m_nat, nat, opt_nat, sch_nat)
        train_step(step, m_peft, peft, opt_peft, sch_peft)
        for name, layer in adapted_layers(m_nat):
            masked_nat = layer.core.values[0] == 0
            masked_peft = m_peft.get_submodule(name).lora_E["default"].view(-1) == 0
            assert torch.equal(masked_nat, masked_peft), (step, name)
        with torch.no_grad():
            torch.testing.assert_close(m_nat(probe), m_peft(probe), rtol=0, atol=1e-6)
        assert nat.metrics()["budget"] == peft.metrics()["budget"]
    assert nat.ranks(m_nat) == peft.ranks(m_peft)
    assert sum(nat.ranks(m_nat).values()) == nat.target_budget == 16
    assert nat.adapter_params(m_nat) == peft.adapter_params(m_peft)
    strip = [{k: e[k] for k in ("step", "budget", "ranks")} for e in nat.history]
    assert strip == [{k: e[k] for k in ("step", "budget", "ranks")} for e in peft.history]
    assert len(strip) >= 3  # allocations happened during budgeting, not only at the end


# -- config validation ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adalora", "peft_adalora"])
@pytest.mark.parametrize(
    "overrides",
    [
        {"target_rank": 0},
        {"init_rank": 1},  # below target_rank 2
        {"deltaT": 0},
        {"tinit": 10, "tfinal": 10},  # T = 20: no budgeting phase
        {"tinit": 0.5, "tfinal": 0.5},
        {"init_rank": 9},  # larger than min(d_in, d_out) = 8
        {"total_budget": 100},  # more than b(0) = 4 · 8
    ],
)
def test_config_errors(name, overrides):
    with pytest.raises(ConfigError) as err:
        build(name, total_steps=20, **overrides)
    assert "\n" not in str(err.value)


# -- resume --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adalora", "peft_adalora"])
@pytest.mark.parametrize("stop", [7, 17])  # mid-budgeting (between allocations) and in the final phase
def test_resume_is_exact(name, stop):
    T, kw = 20, dict(tinit=2, tfinal=5, deltaT=3)
    straight = build(name, T, **kw)
    for step in range(T):
        train_step(step, *straight)

    first = build(name, T, **kw)
    for step in range(stop):
        train_step(step, *first)
    model, method, opt, sched = first
    buf = io.BytesIO()
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    torch.save(state | {"method": method.state_dict()}, buf)
    del first, model, method, opt, sched
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    # A different init: everything must come from the checkpoint.
    model, method, opt, sched = build(name, T, seed=1, **kw)
    method.load_state_dict(ckpt["method"], model, opt, sched)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    for step in range(stop, T):
        train_step(step, model, method, opt, sched)

    ref_model, ref_method = straight[0], straight[1]
    for (n, p), (_, q) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(p, q), n
    assert method.history == ref_method.history and method.ranks(model) == ref_method.ranks(ref_model)


# -- paper presets -------------------------------------------------------------------------


def test_paper_presets_compose():
    from hydra import compose, initialize_config_dir

    for method in ("adalora", "peft_adalora"):
        for task in GLUE:
            for budget in ("r2", "r8"):
                assert (CONF / "preset" / "paper" / method / "glue" / task / f"{budget}.yaml").is_file()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for method in ("adalora", "peft_adalora"):
            cfg = compose("config", overrides=[f"method={method}", "task=glue/rte", "budget=r2"])
            assert cfg.method.name == method
            assert (cfg.method.target_rank, cfg.method.init_rank) == (2, 4)
            assert (cfg.method.tinit, cfg.method.deltaT, cfg.method.tfinal) == (600, 1, 1800)
            assert (cfg.method.alpha, cfg.method.orth_reg_weight) == (32, 0.3)
            assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size) == (1.2e-3, 50, 32)
            assert (cfg.train.warmup_steps, cfg.train.warmup_ratio, cfg.train.weight_decay) == (200, None, 0.01)
            assert (cfg.task.max_seq_length, cfg.model.classifier_dropout) == (320, 0.2)
        cfg = compose("config", overrides=["method=adalora", "task=glue/mrpc", "budget=r8"])
        assert (cfg.method.target_rank, cfg.method.init_rank) == (8, 12)
        assert (cfg.train.warmup_steps, cfg.train.warmup_ratio) == (None, 0.1)
        cfg = compose("config", overrides=["method=adalora", "task=glue/qnli", "budget=r2"])
        assert cfg.train.lr == 5e-4  # the script's value, not Table 8's 1.2e-3
