"""The adapter-overhead benchmark (the triadapt/bench package): runs end to end, writes its tables, measures
the right things. No timing thresholds here: timings depend on the machine."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from triadapt.bench import config
from triadapt.bench import runner as bench

ROWS = ["floor", "full", "lora", "adalora", "increlora", "triadapt", "peft_lora", "peft_adalora"]


@pytest.fixture(scope="module")
def tiny():
    cfg = config.model_config("tiny_bert")
    base, _ = bench.build_base(cfg, 0)
    return cfg, base, bench.make_batch(base, 4, 16, torch.device("cpu"), 0)


def runner(tiny, method, phase="steady", rank=8):
    cfg, base, batch = tiny
    return bench.Runner(bench.Spec(method, phase, rank), base, cfg, batch, torch.device("cpu"), 345, 1, 0)


def test_bench_command_end_to_end(tmp_path, tiny_glue_dir):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "triadapt.bench", "--model", "tiny_bert", "--steps", "2", "--repeats", "1",
           "--out", str(out), "--data-dir", str(tiny_glue_dir), "--growth-model", "tiny_bert",
           "--scaling-models", "tiny_bert,tiny_deberta", "--batch-size", "8", "--seq-len", "32", "--threads", "1",
           "--overhead-model", "tiny_bert", "--overhead-steps", "2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| variant |" in proc.stdout and "## Targets" in proc.stdout  # the Markdown table on stdout

    with (out / "bench.csv").open() as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(ROWS) <= set(rows)  # a row per method, plus the growth-phase rows of the adaptive ones
    assert {f"{m}:growth" for m in ("adalora", "increlora", "triadapt", "peft_adalora")} <= set(rows)
    for r in rows.values():
        assert float(r["median_s"]) > 0 and r["ratio_floor"] and r["ratio_lora"] and r["hook_median_ms"]
        assert (r["peak_rss_mb"] and r["peak_live_mb"]) or r["phase"] == "growth"  # memory of every method, own child
    assert float(rows["floor"]["ratio_floor"]) == 1.0 and float(rows["lora"]["ratio_lora"]) == 1.0
    # the adaptive methods are timed at LoRA's final average rank
    for m in ("adalora", "increlora", "triadapt", "peft_adalora"):
        assert float(rows[m]["rank_effective"]) == pytest.approx(8.0)

    for r in rows.values():  # every row counts one step's gradient tensors and autograd nodes
        assert int(r["autograd_nodes"]) > 0 and int(r["grad_tensors"]) >= 0
    assert int(rows["floor"]["grad_tensors"]) == 0 and int(rows["lora"]["grad_tensors"]) > 0

    with (out / "overhead.csv").open() as f:  # the dispatch-bound section, beside the main one
        overhead = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(overhead) == set(rows)
    assert all(r["clock"] == "cpu" and int(r["autograd_nodes"]) > 0 for r in overhead.values())
    assert float(overhead["lora"]["ratio_lora"]) == 1.0
    assert "## Overhead: tiny_bert, batch 1 × seq 8, 1 thread" in proc.stdout

    result = json.loads((out / "bench.json").read_text())
    assert result["overhead"] and all(len(s["times_s"]) == 2 for s in result["overhead"])
    assert any(t["target"].startswith("overhead: triadapt ≤ 1.15 × lora") for t in result["targets"])
    machine = result["machine"]
    assert machine["cpu_count"] and machine["torch"] == torch.__version__ and machine["torch_threads"] == 1
    assert [s["variant"] for s in result["steps"]][: len(ROWS)] == ROWS
    assert all(len(s["times_s"]) == 2 for s in result["steps"])
    assert "VmHWM" in result["memory_measure"] and "mallinfo2" in result["memory_measure"]
    assert result["machine"]["malloc"].startswith("keep")
    event = result["growth_event"]["all_modules"]  # the growth-event timing entry
    assert event["modules"] == 12 and event["modules_grown"] == 12 and event["median_ms"] > 0
    assert result["growth_event"]["first_event"]["modules_grown"] >= 1
    assert {t["target"].split(" ≤")[0] for t in result["targets"]} >= {"lora", "triadapt", "increlora"}

    scaling = list(csv.DictReader((out / "scaling.csv").open()))
    assert {r["sweep"] for r in scaling} == {"rank", "seq_len", "model"}
    assert {r["x"] for r in scaling if r["sweep"] == "model"} == {"tiny_bert", "tiny_deberta"}
    assert (out / "scaling.png").stat().st_size > 0
    modes = {r["mode"]: r for r in csv.DictReader((out / "eval.csv").open())}
    assert set(modes) == {"dynamic_sorted", "dynamic_unsorted", "max_length"}
    assert float(modes["max_length"]["padding_pct"]) > float(modes["dynamic_sorted"]["padding_pct"])
    assert (out / "summary.md").read_text().startswith("# triadapt bench")


def test_floor_computes_no_weight_gradient(tiny):
    r = runner(tiny, "floor")
    seen = []
    r.model.base_model.embeddings.register_forward_hook(lambda module, args, output: seen.append(output))
    r.step()
    assert r.method is None and r.optimizer is None
    assert all(p.grad is None and not p.requires_grad for p in r.model.parameters())
    # backward reached the output of every adapted module (layer 0's query/key/value are the leaves) ...
    layer0 = r.model.base_model.encoder.layer[0].attention.self
    assert len(r.floor_leaves) == 3
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in r.floor_leaves)
    assert layer0.query.weight.shape[0] == r.floor_leaves[0].shape[-1]
    # ... and went no further: nothing below them needs a gradient
    assert not seen[0].requires_grad and seen[0].grad is None


def test_adaptive_methods_are_timed_at_the_final_rank(tiny):
    lora = runner(tiny, "lora")
    assert lora.ranks() == (8.0, 8.0)
    tri = runner(tiny, "triadapt")  # growth replayed through load_state_dict, as a resume does
    assert tri.ranks()[0] == pytest.approx(8.0) and tri.method.total_rank == tri.method.target_total
    before = len(tri.optimizer.param_groups)
    tri.step()
    assert tri.method.total_rank == tri.method.target_total and len(tri.optimizer.param_groups) == before
    inc = runner(tiny, "increlora")
    assert inc.method.finished and inc.ranks()[0] == pytest.approx(8.0)
    ada = runner(tiny, "adalora")
    ada.prepare()  # reaches the final phase: the allocation pattern is frozen
    assert ada.method.pattern is not None and ada.ranks() == (pytest.approx(8.0), 12.0)
    grow = runner(tiny, "triadapt", "growth")
    events = list(grow.method._event_steps())
    assert grow.step_no == events[0] - 1  # one warm-up step, then the first timed step is an event
    grow.step()
    grow.step()
    assert grow.method.history and grow.method.history[0]["step"] == events[0]


def test_step_counts_tensors_and_autograd_nodes(tiny):
    """The counting step reports the gradient tensors the optimizer steps and the graph's nodes;
    TriAdaptLoRA's tensors grow with its growth events (three per module and event), not its rank."""
    lora, tri = runner(tiny, "lora"), runner(tiny, "triadapt")
    for r in (lora, tri):
        r.step(count=True)
    trainable = [p for g in tri.optimizer.param_groups for p in g["params"] if p.requires_grad]
    assert tri.tensors == len(trainable)
    heads = lora.tensors - 2 * len(tri.method.layers)  # lora: one A and one B per module, plus the heads
    blocks = sum(1 + sum(name in e["selected"] for e in tri.method.history) for name in tri.method.layers)
    assert tri.tensors == 3 * blocks + heads
    assert tri.method.total_rank > blocks  # events add several ranks each: fewer tensors than ranks
    x = torch.ones(3, requires_grad=True)
    assert bench.autograd_nodes((x * 2).sum()) == 3  # SumBackward, MulBackward, AccumulateGrad


def test_paired_ratios():
    assert bench.paired_ratio([2.0, 4.0, 3.0], [1.0, 2.0, 3.0]) == 2.0
    assert bench.quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert bench.ratio_quantile([2.0, 4.0], [1.0, 1.0], 0.25) == 2.5


def test_method_configs_resolve_the_budget():
    cfg = config.method_config("peft_adalora", 4)
    assert cfg.name == "peft_adalora" and cfg.target_rank == 4 and cfg.tinit == 0.1  # merged with adalora.yaml
    assert config.method_config("lora", 16, dropout=0.1).r == 16
    with pytest.raises(SystemExit):
        config.model_config("no_such_model")


def test_folded_and_factored_paths_agree():
    """The adapted layer folds the adapter into the weight when the batch outweighs it, and keeps
    the factored form otherwise: the same outputs and gradients either way."""
    from triadapt.methods import core

    torch.manual_seed(0)
    layer = core.AdaptedLinear(torch.nn.Linear(16, 12), core.TriangularCore(), scale=0.5)
    for k, r0 in ((1, 0), (2, 1)):
        layer.append_factors(torch.randn(k, 16), torch.randn(12, k))
        layer.core.append(torch.randn(core.TriangularCore.block_numel(r0, r0 + k, True)), k)
    x = torch.randn(40, 16, dtype=torch.float32)
    assert core.fold_pays(40, 16, 12) and not core.fold_pays(4, 16, 12)
    grads = []
    for fold in (True, False):
        xi = x.clone().requires_grad_(True)
        if fold:
            y = layer(xi)
        else:
            y = torch.cat([layer(xi[i : i + 4]) for i in range(0, 40, 4)])  # 4 rows: factored
        y.pow(2).sum().backward()
        grads.append([y.detach(), xi.grad] + [p.grad.clone() for p in layer.parameters() if p.grad is not None])
        layer.zero_grad(set_to_none=True)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
