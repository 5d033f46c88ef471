"""TriAdaptLoRA (methods.md §4) on a small stack of linears, driven by a minimal loop in the
documented hook order (extra_loss → backward → clip → before_step → step → after_step)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from toy_models import QueryValue

from triadapt.errors import ConfigError
from triadapt.methods.base import RunContext, build_method
from triadapt.methods.core import DiagonalCore, TriangularCore, adapted_layers
from triadapt.methods.triadapt import growth_count, threshold_candidates
from triadapt.schedules import GroupedLinearSchedule

CONF = Path(__file__).resolve().parents[1] / "conf" / "method" / "triadapt.yaml"
D = 16
N_BLOCKS = 4  # 8 adapted matrices (query, value per block)
STEPS = 60


class Block(QueryValue):
    def __init__(self) -> None:
        super().__init__(D)

    def forward(self, x):
        return x + torch.tanh(self.value(self.query(x)))


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(N_BLOCKS))

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def make_method(steps: int = STEPS, seed: int = 0, **overrides):
    cfg = OmegaConf.load(CONF)
    cfg.target_rank = 4  # the yaml reads ${budget.rank}
    for key, value in overrides.items():
        cfg[key] = value
    ctx = RunContext(total_steps=steps, target_modules=["query", "value"], learning_rate=1e-2, seed=seed)
    return build_method(cfg, ctx)


def setup(steps: int = STEPS, seed: int = 0, **overrides):
    method = make_method(steps, seed, **overrides)
    torch.manual_seed(123)
    model = Stack()
    groups = method.inject(model)
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    scheduler = GroupedLinearSchedule(optimizer, warmup_steps=3, total_steps=steps)
    return method, model, optimizer, scheduler


def data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(5, 4, D, generator=g), torch.randn(5, 4, D, generator=g)


def forward_backward(method, model, optimizer, step, batches):
    x, y = batches[0][step % 5], batches[1][step % 5]
    loss = F.mse_loss(model(x), y)
    reg = method.extra_loss(model)
    if reg is not None:
        loss = loss + reg
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)


def train(method, model, optimizer, scheduler, start: int, stop: int, batches=None):
    batches = batches or data()
    for step in range(start, stop):
        forward_backward(method, model, optimizer, step, batches)
        method.before_step(step, model, optimizer, scheduler)
        optimizer.step()
        scheduler.step()
        method.after_step(step, model, optimizer, scheduler)
        optimizer.zero_grad(set_to_none=True)


def layers(model):
    return dict(adapted_layers(model))


def randomise(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name or ".core." in name:
                p.copy_(torch.randn(p.shape, generator=g))


def dense_core(core: TriangularCore) -> torch.Tensor:
    """C rebuilt entry by entry from the single-variant blocks: each holds rows ℓ_i of L (entries
    0..i), then columns u_j of U (entries 0..j), for the ranks of its event."""
    r = core.rank
    c = torch.zeros(r, r)
    for block, (r0, r1, triangular) in zip(core.blocks, core.spans):
        assert triangular
        values = iter(block.tolist())
        for i in range(r0, r1):
            for col in range(i + 1):
                c[i, col] += next(values)
        for j in range(r0, r1):
            for row in range(j + 1):
                c[row, j] += next(values)
        assert next(values, None) is None  # no extra in-block entries
    return c


# -- parametrisation (§4.1) --------------------------------------------------------------------------


def test_single_core_is_lower_rows_plus_upper_cols():
    method, model, *_ = setup(init_rank=3)
    layer = layers(model)["layers.0.query"]
    randomise(model)
    core = layer.core
    assert isinstance(core, TriangularCore) and core.n_components == 3
    # one block for the three initial ranks: L rows (1 + 2 + 3 entries), then U columns (1 + 2 + 3)
    assert [tuple(p.shape) for p in core.blocks] == [(12,)]
    block = core.blocks[0]
    c = core.matrix()
    assert torch.equal(c, dense_core(core))
    assert c[2, 0] == block[3] and c[0, 2] == block[9]  # strictly lower / upper
    assert c[1, 1] == block[2] + block[8]  # the diagonal is parametrised twice
    assert torch.equal(torch.tril(c, -1), torch.tril(core.lower(), -1))
    assert torch.equal(torch.triu(c, 1), torch.triu(core.upper(), 1))


def test_block_c0_layout():
    method, model, opt, sched = setup(init="block_c0", init_rank=1, incre_rank_num=2, init_warmup=0, incre_interval=1,
                                      overshoot="allow")
    method._scores = lambda: {name: float(name == "layers.0.query") for name in method.layers}
    train(method, model, opt, sched, 0, 2)  # one event at step 1
    core = layers(model)["layers.0.query"].core
    # rank 0 (ℓ_00, u_00), then the event's dense block: L rows 1..2 × cols 0..2, U rows 0..2 × cols 1..2
    assert [tuple(p.shape) for p in core.blocks] == [(2,), (12,)] and core.n_components == 2
    layer = layers(model)["layers.0.query"]
    assert layer.lora_A[1].shape == (2, D) and layer.lora_B[1].shape == (D, 2)
    assert layer.lora_A[1].abs().sum() > 0 and layer.lora_B[1].abs().sum() > 0  # A, B ~ N(0, 0.02²)
    randomise(model)
    lo = torch.zeros(3, 3)
    up = torch.zeros(3, 3)
    lo[0, 0], up[0, 0] = core.blocks[0]
    lo[1:3, :3], up[:3, 1:3] = core.blocks[1][:6].view(2, 3), core.blocks[1][6:].view(3, 2)
    assert torch.equal(core.matrix(), lo + up)


def test_block_c0_grown_core_block_is_zero():
    method, model, opt, sched = setup(init="block_c0", incre_rank_num=2, init_warmup=0, incre_interval=1)
    train(method, model, opt, sched, 0, 1)
    forward_backward(method, model, opt, 1, data())
    method.before_step(1, model, opt, sched)
    grown = method.history[0]["selected"][0]
    core = layers(model)[grown].core
    assert torch.count_nonzero(core.blocks[-1]) == 0


@pytest.mark.parametrize("core", ["triangular", "diagonal"])
@pytest.mark.parametrize("scaling", ["alpha_over_r", "constant"])
def test_forward_equals_dense_delta_w(core, scaling):
    method, model, *_ = setup(init_rank=3, core=core, scaling=scaling)
    randomise(model)
    layer = layers(model)["layers.1.value"]
    s = 32 / (3 + 1e-5) if scaling == "alpha_over_r" else 2.0
    assert layer.scale == s
    a = torch.cat(list(layer.lora_A))
    b = torch.cat(list(layer.lora_B), dim=1)
    c = dense_core(layer.core) if core == "triangular" else torch.diag(torch.cat(list(layer.core.values)))
    delta = s * b @ c @ a
    x = torch.randn(5, D)
    assert torch.allclose(layer(x), layer.base(x) + x @ delta.T, atol=1e-5)
    assert torch.allclose(layer.delta_weight(), delta, atol=1e-5)


@pytest.mark.parametrize("init, init_rank", [("single", 1), ("block_c0", 2)])
def test_delta_w_is_zero_at_init(init, init_rank):
    method, model, *_ = setup(init=init, init_rank=init_rank)
    x = torch.randn(3, D)
    for layer in layers(model).values():
        assert torch.count_nonzero(layer.delta_weight()) == 0
        assert torch.equal(layer(x), layer.base(x))
        # still trainable: A and (single) the core are random
        assert layer.lora_A[0].abs().sum() > 0


def test_single_init_rank_above_one_zeroes_only_the_first_b():
    # As in the author's code: all initial components ~ N(0, 0.02²), then index 0 re-initialised with b = 0.
    method, model, *_ = setup(init="single", init_rank=3)
    for layer in layers(model).values():
        b = layer.lora_B[0]  # the three initial components in one block
        assert torch.count_nonzero(b[:, 0]) == 0
        assert all(torch.count_nonzero(b[:, i]) == D for i in (1, 2))
        assert torch.count_nonzero(layer.lora_A[0]) == 3 * D
        assert torch.count_nonzero(layer.delta_weight()) > 0  # ΔW ≠ 0 at start, unlike init_rank = 1


# -- growth (§4.3, §4.4) ---------------------------------------------------------------------------------


def test_growth_appends_components_and_keeps_existing_state():
    method, model, opt, sched = setup(init_warmup=2, incre_interval=2, incre_rank_num=2)
    batches = data()
    train(method, model, opt, sched, 0, 4)  # Adam state exists, first event at step 4
    before = {name: (layer.rank, dict(layer.named_parameters())) for name, layer in layers(model).items()}
    values = {name: {k: p.detach().clone() for k, p in ps.items()} for name, (_, ps) in before.items()}
    adam = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for _, ps in before.values() for p in ps.values()
            if p in opt.state}
    assert adam  # the check below is not vacuous
    n_groups = len(opt.param_groups)
    forward_backward(method, model, opt, 4, batches)
    method.before_step(4, model, opt, sched)

    selected = method.history[-1]["selected"]
    assert selected and len(opt.param_groups) == n_groups + 1
    new_group = opt.param_groups[-1]["params"]
    old_ids = {id(p) for g in opt.param_groups[:-1] for p in g["params"]}
    for name, layer in layers(model).items():
        r0, old = before[name]
        now = dict(layer.named_parameters())
        for k, p in old.items():
            assert now[k] is p and torch.equal(p, values[name][k])  # same object, same values
            for key, v in adam.get(id(p), {}).items():
                assert torch.equal(opt.state[p][key], v)
        fresh = [p for k, p in now.items() if k not in old]
        if name not in selected:
            assert layer.rank == r0 and not fresh
            continue
        assert layer.rank == r0 + 2 and layer.core.n_components == r0 + 2
        # one block for the event: two rows of A, two columns of B, rows r0, r0+1 of L and the
        # same columns of U (their triangle entries only)
        assert layer.lora_A[-1].shape == (2, D) and layer.lora_B[-1].shape == (D, 2)
        assert layer.core.blocks[-1].shape == (2 * ((r0 + 1) + (r0 + 2)),)
        assert torch.count_nonzero(layer.lora_B[-1]) == 2 * D  # grown b ~ N(0, 0.02²), unlike b_1 = 0
        assert layer.scale == 32 / (r0 + 2 + 1e-5)
        assert len(fresh) == 3 and all(any(p is q for q in new_group) for p in fresh)
        assert not any(id(p) in old_ids for p in fresh)
        assert all(p not in opt.state for p in fresh)
    assert opt.param_groups[-1]["lr"] == 0.0  # restart warmup begins at 0


def test_growth_count_formula():
    for remaining in (1, 7, 40, 144):
        for progress in (0.0, 0.013, 0.25, 0.5, 0.9, 0.999):
            lin = growth_count(remaining, progress, 72, "linear")
            exp = growth_count(remaining, progress, 72, "exponential")
            assert lin == min(max(math.floor(remaining * progress), 1), 72)
            assert exp == min(max(int(math.exp(progress * math.log(remaining))), 1), 72)
    assert growth_count(10, 0.25, 72, "linear") == 2
    assert growth_count(10, 0.05, 72, "linear") == 1  # ⌊0.5⌋ = 0 → at least one module
    assert growth_count(100, 0.9, 5, "linear") == 5  # at most n modules
    assert growth_count(100, 0.5, 72, "exponential") == 10
    assert growth_count(100, 0.0, 72, "exponential") == 1
    # The author's int(exp(p·ln rem)), not ⌊rem^p⌋: they differ at float edges.
    assert 64 ** (1 / 6) == 2.0 and growth_count(64, 1 / 6, 72, "exponential") == 1
    assert 25**0.5 == 5.0 and growth_count(25, 0.5, 72, "exponential") == 4


def test_event_m_follows_the_rule_during_training():
    for growth in ("linear", "exponential"):
        method, model, opt, sched = setup(growth=growth)
        train(method, model, opt, sched, 0, STEPS)
        total = 8
        t0, dt = 6, 3  # 0.1 and 0.05 of 60 steps: events at 9, 12, … (the first multiple of dt after t0)
        assert [e["step"] for e in method.history] == list(range(9, 9 + dt * len(method.history), dt))
        for e in method.history:
            assert e["progress"] == (e["step"] - t0) / (STEPS - t0)
            assert e["m"] == growth_count(32 - total, e["progress"], 8, growth)
            total = e["total_rank"]


def test_threshold_candidates():
    scores = {"b": 0.1, "d": 0.2, "c": 0.3, "a": 0.3}
    assert threshold_candidates(scores, 1) == (0.3, ["a", "c"])  # a tie admits both
    assert threshold_candidates(scores, 3) == (0.2, ["a", "c", "d"])
    assert threshold_candidates(scores, 4) == (0.1, ["a", "c", "d", "b"])


def test_threshold_selects_hand_set_scores():
    method, model, opt, sched = setup(init_warmup=0, incre_interval=1, incre_rank_num=1, overshoot="allow")
    names = list(method.layers)
    hand = {n: 0.0 for n in names} | {names[5]: 0.9, names[2]: 0.5, names[7]: 0.5}
    method._scores = lambda: dict(hand)
    # step 5 of 60 after t0 = 0: m = ⌊(32 − 8)·5/60⌋ = 2, so τ = the 2nd largest score
    forward_backward(method, model, opt, 5, data())
    method.before_step(5, model, opt, sched)
    event = method.history[-1]
    assert event["m"] == 2 and event["threshold"] == 0.5
    assert event["selected"] == [names[5], names[2], names[7]]  # tie at τ: three modules (code behaviour)
    assert {n: layer.rank for n, layer in method.layers.items()} == {n: 1 + (n in event["selected"]) for n in names}


def test_clamp_stops_exactly_at_target_and_reports_withheld():
    method, model, opt, sched = setup(init_warmup=0, incre_interval=1, incre_rank_num=3, target_total_rank=12)
    names = list(method.layers)
    method._scores = lambda: {n: 1.0 for n in names}  # all tie: order by name
    forward_backward(method, model, opt, 30, data())
    method.before_step(30, model, opt, sched)  # m = ⌊4·0.5⌋ = 2, but every module ties at τ
    event = method.history[-1]
    assert event["selected"] == sorted(names)[:2] and method.total_rank == 12
    assert method.layers[sorted(names)[1]].rank == 2  # the last one gets the remaining single rank
    rep = method.report(model)["overshoot"]
    assert rep == {"mode": "clamp", "excess": 0, "withheld": 8 * 3 - 4}


def test_score_is_normalised_frobenius_difference():
    method, model, *_ = setup(init_rank=2)
    randomise(model)
    prev = dict(method.prev_norm)
    expected = {n: (torch.linalg.matrix_norm(dense_core(l.core)) / 2).item() for n, l in method.layers.items()}
    scores = method._scores()
    for n in method.layers:
        assert scores[n] == pytest.approx(expected[n] - prev[n], abs=1e-6)
        assert method.prev_norm[n] == pytest.approx(expected[n], abs=1e-6)
    assert all(abs(s) < 1e-7 for s in method._scores().values())  # unchanged core → 0


def test_initial_reference_value_is_set_at_construction():
    method, model, *_ = setup()
    for n, layer in method.layers.items():
        c = layer.core.matrix()
        assert method.prev_norm[n] == pytest.approx(torch.linalg.matrix_norm(c).item(), abs=1e-7)


@pytest.mark.parametrize("incre_rank_num", [2, 5])
def test_total_rank_reaches_target_exactly_with_clamp(incre_rank_num):
    method, model, opt, sched = setup(incre_rank_num=incre_rank_num)
    train(method, model, opt, sched, 0, STEPS)
    assert method.total_rank == 32 == sum(method.ranks(model).values())
    assert method.history[-1]["total_rank"] == 32
    assert method.report(model)["overshoot"]["excess"] == 0
    assert method.metrics()["total_rank"] == 32.0
    assert len(opt.param_groups) == 1 + len(method.history)


def test_allow_records_overshoot():
    method, model, opt, sched = setup(incre_rank_num=5, overshoot="allow")  # 5 does not divide 32 − 8
    train(method, model, opt, sched, 0, STEPS)
    total = sum(method.ranks(model).values())
    assert total > 32 and method.report(model)["overshoot"]["excess"] == total - 32


def test_growth_none_is_uniform_rank():
    method, model, opt, sched = setup(growth="none")
    train(method, model, opt, sched, 0, STEPS)
    assert set(method.ranks(model).values()) == {4}
    assert all(isinstance(layer.core, TriangularCore) for layer in method.layers.values())
    assert method.history == [] and len(opt.param_groups) == 1


def test_random_score_is_reproducible_and_selects_m():
    runs = []
    for seed in (3, 3, 4):
        method, model, opt, sched = setup(seed=seed, score="random", incre_rank_num=1)
        train(method, model, opt, sched, 0, STEPS)
        assert all(len(e["selected"]) == e["m"] or e["total_rank"] == 32 for e in method.history)
        assert all(e["threshold"] is None for e in method.history)
        assert method.total_rank == 32
        runs.append([e["selected"] for e in method.history])
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_diagonal_core_grows_to_target():
    method, model, opt, sched = setup(core="diagonal")
    train(method, model, opt, sched, 0, STEPS)
    assert method.total_rank == 32
    for layer in method.layers.values():
        assert isinstance(layer.core, DiagonalCore) and layer.core.vector().shape == (layer.rank,)
    name, layer = next(iter(method.layers.items()))
    norm = (torch.linalg.vector_norm(layer.core.vector()) / layer.core.n_components).item()
    prev = method.prev_norm[name]
    assert method._scores()[name] == pytest.approx(norm - prev, abs=1e-7)
    assert method.prev_norm[name] == pytest.approx(norm, abs=1e-7)


@pytest.mark.parametrize("core", ["triangular", "diagonal"])
def test_parameter_count(core):
    method, model, opt, sched = setup(core=core, incre_rank_num=1)
    train(method, model, opt, sched, 0, 30)
    ranks = method.ranks(model)
    assert len(set(ranks.values())) > 1  # heterogeneous after growth
    core_params = {"triangular": lambda r: r * (r + 1), "diagonal": lambda r: r}[core]
    expected = sum(r * (D + D) + core_params(r) for r in ranks.values())
    assert method.adapter_params(model) == expected
    assert expected == sum(p.numel() for p in method.adapter_state(model).values())


def test_orthogonal_regulariser():
    method, model, *_ = setup(orth_reg_weight=0.3, init_rank=2)
    terms = []
    for layer in method.layers.values():
        a, b = torch.cat(list(layer.lora_A)), torch.cat(list(layer.lora_B), dim=1)
        terms += [torch.linalg.matrix_norm(a @ a.T - torch.eye(2)), torch.linalg.matrix_norm(b.T @ b - torch.eye(2))]
    assert method.extra_loss(model).item() == pytest.approx(0.3 * sum(terms).item() / 16, rel=1e-6)
    method0, model0, *_ = setup(orth_reg_weight=0.0)
    assert method0.extra_loss(model0) is None


# -- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"target_rank": 0}, "target_rank"),
        ({"target_rank": 17}, "exceeds min"),
        ({"incre_interval": 0}, "incre_interval"),
        ({"incre_interval": -0.5}, "incre_interval"),
        ({"init_rank": 5}, "init_rank"),
        ({"init_warmup": 58, "incre_interval": 1}, "cannot reach"),
        ({"growth": "none", "target_total_rank": 20}, "uniform rank"),
        ({"target_total_rank": 4}, "exceeds target_total_rank"),
        ({"growth": "cubic"}, "growth"),
        ({"overshoot": "maybe"}, "overshoot"),
    ],
)
def test_validation_errors(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        setup(**overrides)
    assert "\n" not in str(err.value)


def test_tiny_fractional_interval_means_every_step():
    method, *_ = setup(incre_interval=0.001)
    assert method.incre_interval == 1


def test_rule_that_falls_short_warns_with_the_exact_prediction():
    # Reachable in principle (2 events × 8 modules × Δr 2 ≥ 24), but the exponential rule admits fewer.
    with pytest.warns(UserWarning, match="reaches total rank 26 of 32"):
        method, model, opt, sched = setup(growth="exponential", init_warmup=45, incre_interval=5)
    train(method, model, opt, sched, 0, STEPS)
    assert method.total_rank == 26


# -- resume ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("score", ["frobenius", "random"])
def test_resume_is_bit_identical(score):
    kw = dict(score=score, dropout=0.1, incre_rank_num=1)
    method, model, opt, sched = setup(**kw)
    train(method, model, opt, sched, 0, STEPS)
    reference, ref_history = model.state_dict(), method.history

    method, model, opt, sched = setup(**kw)
    train(method, model, opt, sched, 0, 25)
    assert 0 < method.total_rank - 8 < 24  # the checkpoint falls mid-growth
    buf = io.BytesIO()
    torch.save({"method": method.state_dict(), "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": torch.get_rng_state()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    # Resume order of the loop: inject, optimizer, scheduler, method state, then the others.
    method2, model2, opt2, sched2 = setup(**kw)
    method2.load_state_dict(ckpt["method"], model2, opt2, sched2)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])
    sched2.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"])
    train(method2, model2, opt2, sched2, 25, STEPS)

    final = model2.state_dict()
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    assert method2.history == ref_history and method2.total_rank == 32
