"""Whole-step capture (``train.cuda_graphs``, triadapt/step_capture.py).

Without CUDA the captured path runs uncaptured — the same padding to length buckets, tensor
learning rates, device-side loss sums and skipped non-finite updates — and must train what the
eager loop trains. On a GPU the same comparisons run with the graphs replayed (marker ``cuda``,
``make test-cuda`` / ``scripts/device_check.sh``)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_tiny_mrpc
from test_resume import SCHEDULES
from test_run_e2e import run_py
from triadapt.bench.config import method_config
from triadapt.methods import RunContext, build_method
from triadapt.schedules import GroupedLinearSchedule, add_param_group
from triadapt.step_capture import bucket_length, pad_to_bucket

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make test-cuda on a GPU machine)")


def test_lengths_pad_to_a_few_power_of_two_buckets():
    assert [bucket_length(n, 128) for n in (1, 16, 17, 33, 64, 65, 127, 128)] == [16, 16, 32, 64, 64, 128, 128, 128]
    assert bucket_length(300, 384) == 384  # never past the task's maximum length
    assert len({bucket_length(n, 128) for n in range(1, 129)}) == 4


def test_padding_is_masked_and_changes_no_logit():
    from test_lora import tiny_bert

    model = tiny_bert().eval()
    ids = torch.randint(1, 100, (3, 21), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
             "labels": torch.tensor([0, 1, 0])}  # fmt: skip
    padded = pad_to_bucket(batch, 128, pad_id=0)
    assert padded["input_ids"].shape == (3, 32) and padded["labels"] is batch["labels"]
    assert (padded["attention_mask"][:, 21:] == 0).all() and (padded["input_ids"][:, 21:] == 0).all()
    with torch.no_grad():
        torch.testing.assert_close(model(**padded).logits, model(**batch).logits, atol=1e-6, rtol=1e-5)


def test_tensor_schedule_equals_the_python_schedule_for_every_group_mode():
    """What the graph computes on the device (``tensor_step``) is what ``step()`` sets, to the bit,
    for global, restart and constant groups added mid-run."""

    def make():
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.AdamW([p], lr=3e-3, fused=True)
        return opt, GroupedLinearSchedule(opt, warmup_steps=7, total_steps=60)

    (opt_f, floats), (opt_t, tensors) = make(), make()
    tensors.use_tensor_lrs(torch.device("cpu"))
    step_t = torch.zeros((), dtype=torch.int64)
    adds = {5: "restart", 12: "global", 20: "constant", 31: "restart"}
    for step in range(60):
        if step in adds:
            for opt, sched in ((opt_f, floats), (opt_t, tensors)):
                add_param_group(opt, sched, [torch.nn.Parameter(torch.zeros(3))], 0.0, adds[step])
        floats.step()
        tensors.tensor_step(step_t + 1)
        tensors.current_step += 1
        step_t += 1
        got = [float(g["lr"]) for g in opt_t.param_groups]
        want = [float(torch.tensor(g["lr"], dtype=torch.float32)) for g in opt_f.param_groups]
        assert got == want, step


@pytest.mark.parametrize("name", ["lora", "full", "adalora", "increlora", "triadapt", "peft_adalora"])
def test_each_method_says_which_steps_may_be_captured(name):
    """Growth steps are never recorded, nor steps whose forward/backward hooks score modules."""
    from test_lora import tiny_bert

    ctx = RunContext(total_steps=60, target_modules=["query", "value"], warmup_steps=2)
    cfg = method_config(name, 2, **({"incre_interval": 3, "incre_rank_num": 1} if name == "triadapt" else {}))
    method = build_method(cfg, ctx)
    model = tiny_bert()
    groups = method.inject(model)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = GroupedLinearSchedule(opt, 2, 60)
    modes = []
    for step in range(60):
        modes.append(method.capture_mode(step))
        for p in (p for g in opt.param_groups for p in g["params"]):
            p.grad = torch.randn_like(p) * 1e-3
        method.before_step(step, model, opt, sched)
        opt.step()
        sched.step()
        method.after_step(step, model, opt, sched)
    if name in ("lora", "full"):
        assert set(modes) == {"graph"}
    elif name == "triadapt":
        grown = {e["step"] for e in method.history}
        assert grown and {s for s, m in enumerate(modes) if m == "split"} == grown
        assert all(m == "graph" for s, m in enumerate(modes) if s not in grown)
    elif name == "adalora":
        final = method.schedule.final_start
        assert set(modes[: final + 1]) == {"split"} and set(modes[final + 1 :]) == {"graph"}
    elif name == "increlora":
        assert modes[0] == "eager" and method.finished and modes[-1] == "graph"
    else:  # a method that does not say: never recorded
        assert set(modes) == {"eager"}


def test_graphs_are_captured_after_warm_up_and_again_after_every_growth_event(monkeypatch):
    """The stepper's bookkeeping, with the CUDA calls replaced by counters (what a replay computes
    is tested on a GPU below): a new parameter set gets WARMUP_STEPS eager steps, then one capture,
    then replays; a growth step (split) never replays a graph captured before the growth."""
    from test_lora import BERT_TARGETS, tiny_bert
    from triadapt import step_capture
    from triadapt.train import build_optimizer

    events = []

    class Recorded:
        def replay(self):
            events.append("replay")

    monkeypatch.setattr(step_capture, "record", lambda body: events.append("capture") or Recorded())
    monkeypatch.setattr(step_capture, "on_side_stream", lambda device, fn: fn())
    ctx = RunContext(total_steps=80, target_modules=BERT_TARGETS, warmup_steps=4)
    method = build_method(method_config("triadapt", 6, incre_interval=8, incre_rank_num=1), ctx)
    model = tiny_bert()
    optimizer = build_optimizer(method.inject(model), 1e-3, (0.9, 0.999), 1e-8)
    scheduler = GroupedLinearSchedule(optimizer, 4, 80)
    stepper = step_capture.CapturedSteps(model=model, method=method, optimizer=optimizer, scheduler=scheduler,
                                         clip=1.0, autocast=False, device=torch.device("cpu"), start_step=0)
    stepper.use_graphs = True
    ids = torch.randint(1, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0, 1])}
    modes, per_step = [], []
    for step in range(80):
        modes.append(method.capture_mode(step))
        before = len(events)
        stepper.run(step, batch)
        per_step.append(events[before:] or ["eager"])
    grown = [e["step"] for e in method.history]
    assert len(grown) >= 3 and all(modes[s] == "split" for s in grown)
    # stretches of graph steps between growth events: 2 eager warm-up steps, a capture, replays
    bounds = [-1, *grown, 80]
    for lo, hi in zip(bounds, bounds[1:]):
        stretch = per_step[lo + 1 : hi]
        assert stretch[:2] == [["eager"], ["eager"]], (lo, stretch[:3])
        assert stretch[2:] == [["capture", "replay"]] + [["replay"]] * (len(stretch) - 3), (lo, hi)
    assert all(per_step[s] == ["eager"] for s in grown)  # the parameter set changed: warm-up again
    assert stepper.captures == len(grown) + 1


def _train(method: str, root, capture: bool, device: str = "cpu", extra=()) -> tuple[dict, object, list[float]]:
    data_dir = root / "glue" if (root / "glue").exists() else write_tiny_mrpc(root / "glue")
    run_dir = root / f"run-{capture}"
    run_py("model=tiny_bert", f"method={method}", "budget=r2", "task=glue/mrpc", f"data.dir={data_dir}",
           f"train.device={device}", "train.precision=fp32", "train.max_steps=40", "train.batch_size=8",
           "train.lr=5e-3", "train.eval_every=20", "train.log_every=2", f"train.cuda_graphs={capture}",
           *([] if method == "full" else ["method.dropout=0"]), "+model.architecture.hidden_dropout_prob=0",
           "+model.architecture.attention_probs_dropout_prob=0", *SCHEDULES.get(method, []), *extra,
           f"hydra.run.dir={run_dir}")  # fmt: skip
    losses = [float(x) for x in re.findall(r"\| loss ([0-9.]+) \|", (run_dir / "run.log").read_text())]
    return json.loads((run_dir / "result.json").read_text()), run_dir, losses


def assert_same_history(want: list[dict], got: list[dict]) -> None:
    """The same events, steps, budgets and ranks; thresholds (float scores) within fp32 noise."""
    assert len(got) == len(want)
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-2, abs=1e-12), (a["step"], key)
            else:
                assert b[key] == a[key], (a["step"], key)


def assert_same_training(method: str, tmp_path, device: str) -> dict:
    eager, eager_dir, eager_losses = _train(method, tmp_path, False, device)
    captured, captured_dir, captured_losses = _train(method, tmp_path, True, device)
    assert len(eager_losses) == len(captured_losses) == 20
    assert captured_losses == pytest.approx(eager_losses, abs=2e-4)  # printed with 4 decimals
    for key, value in eager["metrics"]["final"].items():
        assert captured["metrics"]["final"][key] == pytest.approx(value, abs=1e-3), key
    assert captured["budget"]["ranks"] == eager["budget"]["ranks"]
    histories = [d / "rank_history.json" for d in (eager_dir, captured_dir)]
    assert histories[0].exists() == histories[1].exists() == (method in ("adalora", "increlora", "triadapt"))
    if histories[0].exists():
        assert_same_history(*(json.loads(h.read_text()) for h in histories))
    got, want = load_file(captured_dir / "adapter.safetensors"), load_file(eager_dir / "adapter.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=2e-4, rtol=1e-3, msg=key)
    assert eager["timing"]["graph_captures"] is None
    return captured


@pytest.mark.parametrize("method", ["lora", "adalora", "increlora", "triadapt"])
def test_uncaptured_capture_path_trains_what_the_eager_loop_trains(method, tmp_path):
    captured = assert_same_training(method, tmp_path, "cpu")
    assert captured["timing"]["graph_captures"] == {"count": 0, "seconds": 0.0}  # no CUDA: nothing recorded


def test_a_non_finite_loss_skips_its_update_and_stops_at_the_next_read(tmp_path, monkeypatch, capsys):
    """The captured step cannot stop mid-graph: the non-finite step's update is skipped inside
    AdamW (found_inf), and the loop stops with its step number before it evaluates or checkpoints."""
    from test_bad_inputs import one_line, run_main
    from triadapt.methods.lora import LoRA

    calls = {"n": 0}

    def poisoned(self, model):
        calls["n"] += 1
        return torch.tensor(float("nan")) if calls["n"] == 4 else None

    monkeypatch.setattr(LoRA, "extra_loss", poisoned)
    data_dir = write_tiny_mrpc(tmp_path / "glue")
    run_dir = tmp_path / "run"
    code, err = run_main([f"data.dir={data_dir}", "method=lora", "train.cuda_graphs=true", "train.checkpoint_every=2",
                          "train.keep_checkpoints=5", "train.eval_every=2"], run_dir, capsys)  # fmt: skip
    line = one_line(err)
    assert code == 2 and "loss or gradient norm non-finite at step 3 (its update was skipped)" in line
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000002.pt"]
    assert f"the last good state is {run_dir / 'checkpoints' / 'step-00000002.pt'}" in line
    payload = torch.load(run_dir / "checkpoints" / "step-00000002.pt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in payload["model"].values())


def test_cuda_graphs_with_the_foreach_optimizer_is_a_one_line_error(tmp_path):
    proc = run_py("model=tiny_bert", "method=lora", f"data.dir={write_tiny_mrpc(tmp_path / 'glue')}",
                  "train.cuda_graphs=true", "train.fused_optimizer=false", f"hydra.run.dir={tmp_path / 'run'}",
                  check=False)  # fmt: skip
    assert proc.returncode == 2 and "train.cuda_graphs=true replays the fused AdamW kernel" in proc.stderr
    assert not (tmp_path / "run").exists()


# -- on a GPU: the graphs replayed -----------------------------------------------------------------


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("method", ["full", "lora", "adalora", "increlora", "triadapt"])
def test_captured_steps_train_what_eager_steps_train_on_cuda(method, tmp_path):
    """fp32 (no TF32), one seed: the same loss curve, growth events and ranks, final metrics and
    adapter within fp32 tolerance — with the graphs actually replayed."""
    captured = assert_same_training(method, tmp_path, "cuda")
    # Growth events every 3 steps leave no room between them for 2 warm-up steps and a capture:
    # TriAdaptLoRA and IncreLoRA are captured after their last event (re-capture after each event:
    # the CPU bookkeeping test above; a stretch of graph steps in the benchmark's growth phase).
    assert captured["timing"]["graph_captures"]["count"] >= 1


@pytest.mark.cuda
@CUDA
def test_a_stopped_captured_run_resumes_on_cuda(tmp_path, monkeypatch):
    """Stopped at step 20 while TriAdaptLoRA grows, resumed with capture on: it ends where an
    uninterrupted captured run ends (fp32 tolerance: the first steps after a resume run eagerly)."""
    reference, ref_dir, _ = _train("triadapt", tmp_path / "ref", True, "cuda")
    monkeypatch.setenv("TRIADAPT_STOP_AFTER_STEPS", "20")
    stopped = run_py_expect_stop(tmp_path)
    monkeypatch.delenv("TRIADAPT_STOP_AFTER_STEPS")
    resumed, run_dir, _ = _train("triadapt", tmp_path / "stop", True, "cuda")
    assert stopped and "resumed from" in (run_dir / "run.log").read_text()
    assert_same_history(*(json.loads((d / "rank_history.json").read_text()) for d in (ref_dir, run_dir)))
    for key, value in reference["metrics"]["final"].items():
        assert resumed["metrics"]["final"][key] == pytest.approx(value, abs=1e-3), key


def run_py_expect_stop(tmp_path) -> bool:
    try:
        _train("triadapt", tmp_path / "stop", True, "cuda")
    except AssertionError as e:  # run_py raises on the non-zero exit (130, interrupted)
        return "(130)" in str(e)
    return False
