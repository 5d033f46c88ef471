"""One measurement protocol per task: what every experiment's methods share, the optimizer defaults
of the references, and statistics computed in fp32 whatever the forward's precision."""

from __future__ import annotations

import functools
import itertools
from collections import defaultdict

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from torch import nn

import triadapt  # noqa: F401  (registers the resolvers the configs use)
from conftest import CONF
from toy_models import QueryValue
from triadapt.experiment import PROTOCOL_SHARED, inject_with_head, protocol_of
from triadapt.methods.base import RunContext, build_method
from triadapt.methods.core import adapted_layers, orthogonal_regulariser
from triadapt.train import configure_precision

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
PAPER = ("paper_glue_r2", "paper_glue_r8", "paper_squad")


def _jobs(cfg) -> list[dict[str, str]]:
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    overrides = OverridesParser.create().parse_overrides(params)
    return [dict(o.split("=", 1) for o in job) for job in BasicSweeper.split_arguments(overrides, None)[0]]


@functools.cache
def _protocols(name: str) -> list[tuple[dict, dict]]:
    """(job overrides without the seed, protocol) for every distinct job of an experiment."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        jobs = _jobs(compose("config", overrides=[f"experiment={name}"], return_hydra_config=True))
        distinct = {tuple(sorted((k, v) for k, v in job.items() if k != "seed")) for job in jobs}
        out = []
        for job in sorted(distinct):
            cfg = compose("config", overrides=[f"experiment={name}", *(f"{k}={v}" for k, v in job)])
            out.append((dict(job), protocol_of(cfg)))
    return out


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_methods_of_a_task_share_the_protocol(name):
    """Within every experiment, all jobs of one task (and budget) share every protocol key."""
    cells = defaultdict(list)
    for job, protocol in _protocols(name):
        cells[(job.get("task"), job.get("budget"))].append((job, protocol["shared"]))
    assert cells
    for jobs in cells.values():
        first_job, first = jobs[0]
        assert set(first) == set(PROTOCOL_SHARED)
        for job, shared in jobs[1:]:
            differs = {k: (first[k], shared[k]) for k in first if first[k] != shared[k]}
            assert not differs, f"{name}: {first_job} vs {job} differ in {differs}"
        # the references' optimizer and fp32 everywhere; no decay on biases / LayerNorm
        assert (first["adam_eps"], first["adam_betas"], first["precision"]) == (1e-8, [0.9, 0.999], "fp32")
        assert first["decay_norm_and_bias"] is False and first["max_grad_norm"] == 1.0
        if name in PAPER:  # one fixed evaluation grid, not "per epoch" (whose count follows the epochs)
            assert isinstance(first["eval_every"], int) and first["eval_every"] > 0


@pytest.mark.parametrize("name", PAPER)
def test_paper_experiments_vary_only_declared_recipes(name):
    """Methods may differ in their recipe, and the recipe records it: AdaLoRA runs 7 MNLI epochs, the others 9."""
    protocols = _protocols(name)
    assert {job["method"] for job, _ in protocols} == {"lora", "adalora", "increlora", "triadapt"}
    for _, protocol in protocols:
        assert {"lr", "epochs", "warmup_steps", "weight_decay"} <= set(protocol["recipe"])
    if name == "paper_glue_r2":
        epochs = {job["method"]: p["recipe"]["epochs"] for job, p in protocols if job["task"] == "glue/mnli"}
        assert epochs == {"lora": 9, "adalora": 7, "increlora": 9, "triadapt": 9}
        shared = {p["shared"]["eval_every"] for job, p in protocols if job["task"] == "glue/mnli"}
        assert shared == {1000}


def test_every_paper_preset_shares_the_task_protocol():
    """The presets alone (hparams=paper, no experiment) share the protocol across methods too."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for task, budget in itertools.product(("mnli", "rte", "stsb"), ("r2", "r8")):
            shared = [
                protocol_of(compose("config", overrides=[f"method={m}", f"task=glue/{task}", f"budget={budget}"]))["shared"]
                for m in ("lora", "adalora", "increlora", "triadapt", "peft_adalora")
            ]
            assert all(s == shared[0] for s in shared), (task, budget)
            assert shared[0]["precision"] == "fp32" and isinstance(shared[0]["eval_every"], int)


def test_protocol_records_recipe_and_method_knobs():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["method=triadapt", "task=glue/rte", "budget=r2", "hparams=paper"])
    protocol = protocol_of(cfg)
    assert protocol["recipe"]["lr"] == 1.2e-3 and protocol["recipe"]["epochs"] == 50
    assert protocol["recipe"]["method.target_rank"] == 2  # interpolations resolved
    assert protocol["recipe"]["method.orth_reg_weight"] == 0.3
    assert protocol["shared"]["max_seq_length"] == 320 and protocol["shared"]["eval_every"] == 100
    assert protocol["shared"]["tf32"] is False  # only ever true on CUDA


def test_ablation_varies_the_grown_groups_schedule():
    protocols = _protocols("ablation_triadapt")
    schedules = {p["recipe"]["method.new_group_schedule"] for _, p in protocols}
    assert schedules == {"restart", "constant", "global"}
    knobs = ("growth", "score", "core", "new_group_schedule")
    variants = {tuple(p["recipe"][f"method.{k}"] for k in knobs) for _, p in protocols}
    headline = ("linear", "frobenius", "triangular", "restart")
    assert headline in variants
    # one factor at a time: every other variant differs from the headline in exactly one knob
    assert all(sum(a != b for a, b in zip(v, headline)) == 1 for v in variants - {headline})
    assert len(variants) == 7


# -- optimizer defaults ---------------------------------------------------------------------------


class _Pooler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.pooler = _Pooler()
        self.classifier = nn.Linear(8, 2)


def _decay_of(method_name: str, decay_norm_and_bias: bool) -> dict[str, float]:
    model = _Tiny()
    cfg = OmegaConf.create({"name": method_name, "r": 2, "alpha": 16, "dropout": 0.0})
    method = build_method(cfg, RunContext(total_steps=10, target_modules=["query"], weight_decay=0.01))
    groups, _ = inject_with_head(method, model, ["pooler", "classifier"], 0.01, decay_norm_and_bias)
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in groups:
        for p in g["params"]:
            assert names[id(p)] not in out  # every parameter in exactly one group
            out[names[id(p)]] = g["weight_decay"]
    return out


def test_no_weight_decay_on_biases_and_layernorm_by_default():
    decay = _decay_of("lora", decay_norm_and_bias=False)
    assert decay["pooler.dense.weight"] == decay["classifier.weight"] == decay["query.lora_A.0"] == 0.01
    for name in ("pooler.dense.bias", "pooler.norm.weight", "pooler.norm.bias", "classifier.bias"):
        assert decay[name] == 0.0, name
    assert "norm.weight" not in decay and "query.base.bias" not in decay  # frozen: in no group
    full = _decay_of("full", decay_norm_and_bias=False)
    assert full["norm.weight"] == full["query.bias"] == 0.0 and full["query.weight"] == 0.01


def test_decay_norm_and_bias_switch_restores_uniform_decay():
    assert set(_decay_of("lora", decay_norm_and_bias=True).values()) == {0.01}


def test_train_defaults_match_the_references():
    train = OmegaConf.load(CONF / "train" / "default.yaml")
    assert (train.adam_eps, list(train.adam_betas), train.decay_norm_and_bias, train.tf32) == (
        1e-8, [0.9, 0.999], False, False)


def test_precision_switch_on_cpu():
    cpu = torch.device("cpu")
    assert configure_precision("bf16", False, cpu) is True
    assert configure_precision("fp32", True, cpu) is False
    assert configure_precision("auto", False, cpu) is False


# -- statistics in fp32 under autocast ------------------------------------------------------------

D = 32


class _Net(QueryValue):
    def __init__(self) -> None:
        super().__init__(D)

    def forward(self, x):
        return self.value(torch.tanh(self.query(x)))


def _method(name: str, **knobs):
    torch.manual_seed(0)
    cfg = OmegaConf.load(CONF / "method" / f"{name}.yaml")
    cfg.target_rank = 4  # the yaml reads ${budget.rank}
    for key, value in ({"tinit": 0, "tfinal": 0, "deltaT": 1} if name == "adalora" else {}).items() | knobs.items():
        cfg[key] = value
    model = _Net()
    method = build_method(cfg, RunContext(total_steps=20, target_modules=["query", "value"], seed=0))
    method.inject(model)
    return method, model


def _near_orthonormal(layers):
    """Orthonormal rows of the concatenated A and columns of B, plus a little noise."""
    with torch.no_grad():
        for layer in layers:
            qa, _ = torch.linalg.qr(torch.randn(D, layer.rank))
            qb, _ = torch.linalg.qr(torch.randn(D, layer.rank))
            r0 = 0
            for a, b in zip(layer.lora_A, layer.lora_B):  # one block of k ranks each
                k = a.shape[0]
                a.copy_(qa[:, r0 : r0 + k].T + 1e-4 * torch.randn_like(a))
                b.copy_(qb[:, r0 : r0 + k] + 1e-4 * torch.randn_like(b))
                r0 += k


def test_regulariser_under_bf16_autocast_is_the_fp32_one():
    _, model = _method("triadapt", init_rank=4)
    layers = [layer for _, layer in adapted_layers(model)]
    _near_orthonormal(layers)
    params = [p for layer in layers for p in layer.lora_A] + [p for layer in layers for p in layer.lora_B]

    def value_and_grads(autocast: bool):
        for p in params:
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            reg = orthogonal_regulariser(layers)
        reg.backward()
        return reg.detach(), [p.grad.clone() for p in params]

    ref, ref_grads = value_and_grads(False)
    got, got_grads = value_and_grads(True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    # The test discriminates: the same products in bf16 are far off for near-orthonormal factors.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = layers[0].A()
        bf16 = torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0]))
    exact = torch.linalg.matrix_norm(a.detach() @ a.detach().T - torch.eye(a.shape[0]))
    assert abs(bf16.float().item() - exact.item()) > 0.1 * exact.item()


def test_increlora_score_under_autocast_is_the_fp32_one():
    method, model = _method("increlora")
    name, layer = next(iter(adapted_layers(model)))
    with torch.no_grad():
        layer.core.values[0].fill_(0.5)  # ΔW ≠ 0
    x, grad = torch.randn(2, 5, D), torch.randn(2, 5, D)
    method._score(name, layer, x, grad)
    ref = method.raw[name].clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        method._score(name, layer, x, grad)
        dw = layer.delta_weight()
    assert method.raw[name].dtype == dw.dtype == torch.float32
    torch.testing.assert_close(method.raw[name], ref, rtol=1e-6, atol=0)


def test_adalora_importance_under_autocast_is_the_fp32_one():
    method, model = _method("adalora")
    x = torch.randn(4, D)
    model(x).square().mean().backward()
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.core.values[0].grad = torch.randn_like(layer.core.values[0])
    ref = _method_copy_importance(method, autocast=False)
    got = _method_copy_importance(method, autocast=True)
    for name in ref:
        for r, g in zip(ref[name], got[name]):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, r, rtol=0, atol=0)


def _method_copy_importance(method, autocast: bool) -> dict:
    method.ema_ipt, method.ema_unc = {}, {}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        method._update_importance()
        scores = method.triplet_scores()
    return {n: [*method.ema_ipt[n], scores[n]] for n in method.ema_ipt}


def test_triadapt_growth_score_under_autocast_is_the_fp32_one():
    method, _ = _method("triadapt", init_rank=3)
    prev = dict(method.prev_norm)
    ref = method._scores()
    method.prev_norm = dict(prev)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = method._scores()
    assert got == ref


def test_result_json_records_the_protocol(tmp_path, tiny_glue_dir):
    import json

    from triadapt.experiment import run

    run_dir = tmp_path / "run"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[
            "logger=none", "hparams=none", "model=tiny_bert", "method=lora", "budget=r2", "task=glue/mrpc",
            f"data.dir={tiny_glue_dir}", "train.max_steps=2", "train.batch_size=8", "train.weight_decay=0.01",
            "train.precision=fp32", "train.save_adapter=false", f"+paths.run_dir={run_dir}"])
    run(cfg)
    protocol = json.loads((run_dir / "result.json").read_text())["protocol"]
    assert protocol["shared"]["batch_size"] == 8 and protocol["shared"]["model"] == "tiny_bert"
    assert (protocol["shared"]["adam_eps"], protocol["shared"]["precision"], protocol["shared"]["eval_every"]) == (
        1e-8, "fp32", "epoch")
    assert protocol["recipe"]["weight_decay"] == 0.01 and protocol["recipe"]["max_steps"] == 2
    assert (protocol["recipe"]["method.r"], protocol["recipe"]["method.alpha"]) == (2, 16)
