"""The bad-input catalogue (docs/reliability.md): every mistake ends with one actionable line
``error: …`` naming the offending value (and the choices, where there are choices), a non-zero
exit, no traceback unless ``debug=true``, and nothing written before overwritten.

Most entries call ``triadapt.experiment.main`` in-process (fast); a few go through ``run.py``
to prove the exit code and the absence of a traceback on the command line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, compose

BASE = ["logger=none", "hparams=none", "model=tiny_bert", "task=glue/mrpc", "train.max_steps=4", "train.batch_size=8"]


def run_main(overrides: list[str], run_dir: Path, capsys) -> tuple[int, str]:
    """``main`` on a composed config; returns (exit code, stderr)."""
    from triadapt.experiment import main

    cfg = compose([*BASE, *overrides, f"+paths.run_dir={run_dir}"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(cfg)
    return exit_info.value.code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def write_tsv(path: Path, header: str | None, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in ([header] if header else []) + rows), encoding="utf-8")


MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
MRPC_ROWS = [f"{i % 2}\t{i}\t{i + 100}\tsentence {i}\tanother {i}" for i in range(16)]


def bad_mrpc(tmp_path: Path, header: str | None, rows: list[str]) -> Path:
    root = tmp_path / "bad_glue"
    write_tsv(root / "MRPC" / "train.tsv", header, rows)
    write_tsv(root / "MRPC" / "dev.tsv", MRPC_HEADER, MRPC_ROWS)
    return root


# (id, overrides (``{glue}``: the tiny GLUE dir, ``{tmp}``: tmp_path), text the single line must hold)
CATALOGUE = [
    # data
    ("data-dir-missing", ["data.dir={tmp}/nowhere"], ["data dir {tmp}/nowhere does not exist", "data.dir"]),
    ("task-folder-missing", ["data.dir={glue}", "task=glue/rte"], ["task folder {glue}/RTE not found", "data.dir"]),
    ("max-train-samples-0", ["data.dir={glue}", "data.max_train_samples=0"], ["data.max_train_samples=0", "positive"]),
    ("max-eval-samples-neg", ["data.dir={glue}", "data.max_eval_samples=-1"], ["data.max_eval_samples=-1", "positive"]),
    # budget and methods
    ("lora-rank-0", ["data.dir={glue}", "method=lora", "budget.rank=0"], ["method.r=0", "positive"]),
    ("lora-rank-too-large", ["data.dir={glue}", "method=lora", "budget.rank=64"], ["method.r=64", "exceeds min(d_in, d_out)"]),
    ("adalora-rank-0", ["data.dir={glue}", "method=adalora", "budget.rank=0"], ["method.target_rank=0"]),
    ("adalora-rank-too-large", ["data.dir={glue}", "method=adalora", "budget.rank=22"], ["method.init_rank=33", "exceeds min(d_in, d_out)"]),
    ("increlora-rank-0", ["data.dir={glue}", "method=increlora", "budget.rank=0"], ["method.target_rank=0"]),
    ("triadapt-rank-0", ["data.dir={glue}", "method=triadapt", "budget.rank=0"], ["method.target_rank=0"]),
    ("triadapt-rank-too-large", ["data.dir={glue}", "method=triadapt", "train.max_steps=40", "budget.rank=33"],
     ["method.target_rank=33", "exceeds min(d_in, d_out)"]),
    ("adalora-no-budgeting-phase", ["data.dir={glue}", "method=adalora", "train.max_steps=40", "method.tinit=30", "method.tfinal=10"],
     ["method.tinit=30", "no budgeting phase"]),
    ("increlora-growth-too-late", ["data.dir={glue}", "method=increlora", "train.max_steps=40", "method.init_warmup=35", "method.incre_interval=10"],
     ["init_warmup=35", "only 0 fit in 40 steps"]),
    ("triadapt-growth-too-late", ["data.dir={glue}", "method=triadapt", "train.max_steps=40", "method.init_warmup=35", "method.incre_interval=10"],
     ["cannot reach target_total_rank=96", "init_warmup=35"]),
    ("increlora-interval-0", ["data.dir={glue}", "method=increlora", "train.max_steps=40", "method.incre_interval=0"], ["method.incre_interval=0"]),
    ("triadapt-interval-0", ["data.dir={glue}", "method=triadapt", "train.max_steps=40", "method.incre_interval=0"], ["method.incre_interval=0"]),
    ("triadapt-interval-neg", ["data.dir={glue}", "method=triadapt", "train.max_steps=40", "method.incre_interval=-2"], ["method.incre_interval=-2"]),
    # training
    ("batch-size-0", ["data.dir={glue}", "train.batch_size=0"], ["train.batch_size=0", "positive"]),
    ("batch-size-neg", ["data.dir={glue}", "train.batch_size=-3"], ["train.batch_size=-3", "positive"]),
    ("lr-0", ["data.dir={glue}", "train.lr=0"], ["train.lr=0", "> 0"]),
    ("lr-neg", ["data.dir={glue}", "train.lr=-1e-4"], ["train.lr=-0.0001", "> 0"]),
    ("max-steps-neg", ["data.dir={glue}", "train.max_steps=-5"], ["train.max_steps=-5", "positive"]),
    ("epochs-0", ["data.dir={glue}", "train.max_steps=null", "train.epochs=0"], ["train.epochs=0", "> 0"]),
    ("eval-batch-size-0", ["data.dir={glue}", "train.eval_batch_size=0"], ["train.eval_batch_size=0"]),
    ("precision", ["data.dir={glue}", "train.precision=fp16"], ["train.precision='fp16'", "auto, fp32 or bf16"]),
    ("keep-checkpoints-0", ["data.dir={glue}", "train.keep_checkpoints=0"], ["train.keep_checkpoints=0", ">= 1"]),
    ("checkpoint-every-neg", ["data.dir={glue}", "train.checkpoint_every=-1"], ["train.checkpoint_every=-1", ">= 0"]),
    ("wandb-mode", ["data.dir={glue}", "logger=wandb", "logger.mode=onlin"], ["logger.mode='onlin'", "online, offline, disabled"]),
    ("increlora-rank-too-large", ["data.dir={glue}", "method=increlora", "budget.rank=64"],
     ["IncreLoRA target total rank 768", "too large", "exceeds min(d_in, d_out) = 32 of every one"]),
    ("max-seq-length-below-specials", ["data.dir={glue}", "task.max_seq_length=3"],
     ["task.max_seq_length=3 is below 5", "special tokens"]),
    ("max-seq-length-above-positions", ["data.dir={glue}", "task.max_seq_length=100000"],
     ["task.max_seq_length=100000 exceeds the 512 positions of model tiny_bert"]),
    # resume
    ("resume-true-nothing", ["data.dir={glue}", "resume=true"], ["resume=true but {run_dir} holds no checkpoint"]),
]  # fmt: skip

# Refused by validation before the run dir is touched: no result.json, no folder at all.
REFUSED_BEFORE_WRITING = [
    ("seed-abc", ["seed=abc"], ["seed='abc' must be an integer"]),
    ("lr-abc", ["train.lr=abc"], ["train.lr='abc' must be a number"]),
    ("lr-nan", ["train.lr=nan"], ["train.lr=nan must be a finite number"]),
    ("lr-inf", ["train.lr=inf"], ["train.lr=inf must be a finite number"]),
    ("log-every-0", ["train.log_every=0"], ["train.log_every=0 must be a positive integer"]),
    ("eval-every-0", ["train.eval_every=0"], ["train.eval_every=0 must be a positive integer"]),
    ("adam-betas", ["train.adam_betas=[1.5,0.999]"], ["train.adam_betas=[1.5, 0.999] must be two numbers in [0, 1)"]),
    ("adam-eps-0", ["train.adam_eps=0"], ["train.adam_eps=0 must be > 0"]),
    ("weight-decay-neg", ["train.weight_decay=-0.1"], ["train.weight_decay=-0.1 must be >= 0"]),
    ("warmup-ratio-above-1", ["train.warmup_ratio=1.5"], ["train.warmup_ratio=1.5 must lie in [0, 1]"]),
    ("warmup-steps-neg", ["train.warmup_ratio=null", "train.warmup_steps=-1"], ["train.warmup_steps=-1", "non-negative"]),
    ("max-grad-norm-neg", ["train.max_grad_norm=-1"], ["train.max_grad_norm=-1 must be >= 0"]),
    ("device-gpu", ["train.device=gpu"], ["train.device='gpu'; choose auto, cpu, cuda"]),
    ("data-source-typo", ["data.source=locl"], ["data.source='locl'; choose auto, local or hub"]),
    ("dropout-above-1", ["method.dropout=1.5"], ["method.dropout=1.5 must lie in [0, 1)"]),
    ("alpha-neg", ["method.alpha=-16"], ["method.alpha=-16 must be > 0"]),
    ("budget-rank-float", ["budget.rank=1.5"], ["budget.rank=1.5 must be an integer"]),
    ("method-rank-float", ["method=triadapt", "method.target_rank=2.5"], ["method.target_rank=2.5 must be an integer"]),
    ("max-seq-length-0", ["task.max_seq_length=0"], ["task.max_seq_length=0 must be a positive integer"]),
    ("resume-maybe", ["resume=maybe"], ["resume='maybe'; choose auto, true, false or the path of an existing run dir"]),
]  # fmt: skip


@pytest.mark.parametrize("case", REFUSED_BEFORE_WRITING, ids=[c[0] for c in REFUSED_BEFORE_WRITING])
def test_refused_before_anything_is_written(case, tmp_path, tiny_glue_dir, capsys):
    _, overrides, needles = case
    run_dir = tmp_path / "run"
    code, err = run_main([f"data.dir={tiny_glue_dir}", *overrides], run_dir, capsys)
    line = one_line(err)
    assert code == 2 and all(needle in line for needle in needles), line
    assert not run_dir.exists()


def test_resume_accepts_an_existing_run_dir_path(tmp_path):
    from triadapt.validation import validate

    validate(compose([*BASE, f"resume={tmp_path}"]))  # no error: #11's resume=<run dir>


@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_catalogue_entry(case, tmp_path, tiny_glue_dir, capsys):
    _, overrides, needles = case
    run_dir = tmp_path / "run"
    fill = {"glue": tiny_glue_dir, "tmp": tmp_path, "run_dir": run_dir}
    code, err = run_main([o.format(**fill) for o in overrides], run_dir, capsys)
    line = one_line(err)
    assert code == 2
    for needle in needles:
        assert needle.format(**fill) in line
    # The run dir tells the same story (a sweep's report lists it as failed).
    result = json.loads((run_dir / "result.json").read_text()) if (run_dir / "result.json").exists() else None
    if result is not None:
        assert result["status"] == "failed" and "error: " + result["error"]["message"] == line


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_without_a_device(tmp_path, tiny_glue_dir, capsys):
    code, err = run_main([f"data.dir={tiny_glue_dir}", "train.device=cuda"], tmp_path / "run", capsys)
    assert code == 2 and "train.device=cuda but no CUDA device" in one_line(err)


@pytest.mark.parametrize(
    "header, rows, needle",
    [
        ("Quality\t#1 ID\t#2 ID\tsentence1\t#2 String", MRPC_ROWS, "lacks column(s) ['#1 String']"),
        (MRPC_HEADER, [*MRPC_ROWS[:5], "1\t5\tonly three columns"], "train.tsv:7 has 3 tab-separated fields, the header has 5"),
        (MRPC_HEADER, [*MRPC_ROWS[:3], "2\t3\t103\ta\tb"], "train.tsv:5 label '2' is not one of ['0', '1']"),
        (MRPC_HEADER, [], "mrpc train split is empty"),
    ],
    ids=["missing-column", "short-row", "label-outside-set", "header-only"],
)
def test_bad_tsv(header, rows, needle, tmp_path, capsys):
    root = bad_mrpc(tmp_path, header, rows)
    code, err = run_main([f"data.dir={root}"], tmp_path / "run", capsys)
    assert code == 2 and needle in one_line(err)


def test_squad_doc_stride_not_below_max_seq_length(shared_data, tmp_path, capsys):
    code, err = run_main(
        [f"data.dir={shared_data}", "task=squad_v2_devsplit", "task.max_seq_length=128", "task.doc_stride=128"],
        tmp_path / "run", capsys,
    )
    assert code == 2 and "task.doc_stride (128) must be smaller than task.max_seq_length (128)" in one_line(err)


@pytest.mark.parametrize(
    "group, value", [("model", "bert_tiny"), ("method", "loraa"), ("task", "glue/mrcp"), ("experiment", "paper")]
)
def test_unknown_choice_is_named_with_the_options(group, value):
    """Hydra's own message: short, names the value and lists the group's options (for ``task``
    only the top-level ones: the GLUE tasks sit one level down, as ``glue/<name>``)."""
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as info:
        compose([*BASE, f"{group}={value}"])
    message = str(info.value)
    assert f"Could not find '{group}/{value}'" in message and f"Available options in '{group}'" in message
    options = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
    assert options and all(f"\t{option}" in message for option in options)
    assert len(message.splitlines()) < 30


def test_corrupt_checkpoint_is_refused_and_kept(tmp_path, tiny_glue_dir, capsys):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "step-00000005.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"\x80\x04garbage, not a checkpoint" * 10)
    code, err = run_main([f"data.dir={tiny_glue_dir}"], run_dir, capsys)
    line = one_line(err)
    assert code == 2 and f"cannot resume from {ckpt}" in line and "delete the checkpoint" in line
    assert ckpt.read_bytes() == b"\x80\x04garbage, not a checkpoint" * 10


def test_truncated_checkpoint_is_refused_in_one_line(tmp_path, tiny_glue_dir, capsys):
    """A real checkpoint cut in half (torch's zip reader errors can carry a C++ backtrace)."""
    run_dir = tmp_path / "run"
    # train.lr=1e6 may or may not diverge; a checkpoint comes from checkpoint_every on a short run.
    from triadapt.experiment import main

    main(compose([*BASE, f"data.dir={tiny_glue_dir}", "train.checkpoint_every=2", f"+paths.run_dir={run_dir}"]))
    (run_dir / "result.json").unlink()  # as if killed before the end
    ckpt = run_dir / "checkpoints" / "step-00000002.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    code, err = run_main([f"data.dir={tiny_glue_dir}", "train.checkpoint_every=2"], run_dir, capsys)
    assert code == 2 and f"cannot resume from {ckpt}" in one_line(err)


def test_resume_false_with_a_checkpoint_is_refused(tmp_path, tiny_glue_dir, capsys):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "step-00000005.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"whatever")
    code, err = run_main([f"data.dir={tiny_glue_dir}", "resume=false"], run_dir, capsys)
    assert code == 2 and f"{run_dir} holds a checkpoint; pass resume=true" in one_line(err)
    assert ckpt.read_bytes() == b"whatever" and not (run_dir / "result.json").exists()


@pytest.mark.parametrize("resume", ["auto", "false", "true"])
def test_completed_run_dir_is_skipped_never_overwritten(resume, tmp_path, tiny_glue_dir, capsys):
    """The one entry that exits 0: a finished job is skipped, so that re-running a sweep resumes it."""
    from triadapt.experiment import main

    run_dir = tmp_path / "run"
    args = [*BASE, f"data.dir={tiny_glue_dir}", "train.checkpoint_every=2", f"+paths.run_dir={run_dir}"]
    main(compose(args))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    value = main(compose([*args, f"resume={resume}", "train.lr=1e-2"]))  # even with other settings
    assert value == json.loads((run_dir / "result.json").read_text())["metrics"]["best"]["accuracy"]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_inf_loss_stops_at_its_step_with_a_checkpoint_of_the_last_good_state(tmp_path, tiny_glue_dir, capsys):
    """STS-B row 3 has the label 1e30: its batch's MSE overflows to inf."""
    from triadapt.train import epoch_batches

    sts = tiny_glue_dir / "STS-B" / "train.tsv"
    lines = sts.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[1 + 3] = lines[1 + 3].rsplit("\t", 1)[0] + "\t1e30\n"
    sts.write_text("".join(lines), encoding="utf-8")
    step = next(i for i, batch in enumerate(epoch_batches(48, 8, seed=42, epoch=0)) if 3 in batch)
    run_dir = tmp_path / "run"
    overrides = [f"data.dir={tiny_glue_dir}", "task=glue/stsb", "method=lora", "train.max_steps=12"]
    code, err = run_main(overrides, run_dir, capsys)
    line = one_line(err)
    ckpt = run_dir / "checkpoints" / f"step-{step:08d}.pt"
    assert code == 2 and re.search(rf"loss is (inf|nan) at step {step}\b", line) and str(ckpt) in line
    payload = torch.load(ckpt, weights_only=False)
    assert payload["step"] == step and len(payload["loop"]["step_times"]) == step
    assert all(torch.isfinite(t).all() for t in payload["model"].values())
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "failed" and result["error"]["type"] == "TrainingDiverged"
    assert not (run_dir / "adapter.safetensors").exists()


def test_failed_run_writes_failed_status_and_closes_wandb(tmp_path, monkeypatch, capsys):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    (tmp_path / "empty").mkdir()  # exists (validation passes), holds no task folder: fails once the run began
    code, err = run_main([f"data.dir={tmp_path}/empty", "logger=wandb", "logger.mode=offline"], run_dir, capsys)
    assert code == 2 and "not found" in one_line(err)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "failed" and result["error"]["type"] == "DataError"
    assert str(tmp_path / "empty") in result["error"]["message"]
    assert wandb.run is None and list((run_dir / "wandb").glob("offline-run-*"))


def test_debug_re_raises_the_error(tmp_path, capsys):
    from triadapt.errors import DataError
    from triadapt.experiment import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        main(compose([*BASE, f"data.dir={tmp_path}/empty", "debug=true", f"+paths.run_dir={tmp_path / 'run'}"]))


def test_wandb_online_without_api_key_falls_back_to_offline(tmp_path, tiny_glue_dir, monkeypatch, caplog):
    import wandb

    from triadapt.experiment import main
    from triadapt.tracking import Tracker

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(Tracker, "_online_failed", False)
    run_dir = tmp_path / "run"
    args = [*BASE, f"data.dir={tiny_glue_dir}", "logger=wandb", "logger.mode=online", f"+paths.run_dir={run_dir}"]
    main(compose(args))
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "W&B" in r.getMessage()]
    assert len(warnings) == 1 and "W&B failed to start online (UsageError" in warnings[0]
    assert "logging offline instead" in warnings[0] and "wandb sync" in warnings[0]
    assert wandb.run is None and list((run_dir / "wandb").glob("offline-run-*"))


# -- through run.py: exit codes and what the terminal shows --------------------------------


def run_py(*overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in (env or os.environ).items()} | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "run.py", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_hub_unreachable_without_local_data(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRIADAPT_DATA_DIR"}
    run_dir = tmp_path / "run"
    proc = run_py(*BASE, f"hydra.run.dir={run_dir}", env=env)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert "could not load GLUE 'mrpc' from the hub" in line and "data.dir=" in line and "TRIADAPT_DATA_DIR" in line


def test_cli_debug_shows_the_traceback(tmp_path):
    proc = run_py(*BASE, f"data.dir={tmp_path}/nowhere", "debug=true", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert f"error: data dir {tmp_path}/nowhere does not exist" in proc.stderr and "Traceback" in proc.stderr


def test_cli_wandb_unreachable_falls_back_after_init_timeout(tmp_path, tiny_glue_dir):
    """An API key but no network: W&B gives up after WANDB_INIT_TIMEOUT (90 s by default; 3 s
    here, read once per process, hence a subprocess) and the run logs offline and completes."""
    env = os.environ | {"WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567", "WANDB_INIT_TIMEOUT": "3"}
    env.pop("WANDB_MODE", None)
    run_dir = tmp_path / "run"
    started = time.monotonic()
    wandb_online = ["logger=wandb", "logger.mode=online"]
    proc = run_py(*BASE, f"data.dir={tiny_glue_dir}", *wandb_online, f"hydra.run.dir={run_dir}", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.monotonic() - started < 120
    assert "W&B failed to start online" in proc.stdout + proc.stderr
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_cli_unknown_method_is_short_without_traceback(tmp_path):
    proc = run_py(*BASE, "method=loraa", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 1
    assert "Could not find 'method/loraa'" in proc.stderr and "\ttriadapt" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) < 20
    assert not (tmp_path / "run").exists()
