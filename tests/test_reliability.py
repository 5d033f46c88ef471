"""Nothing lost, nothing silently wrong (README "Reliability"): one writer per run dir, no
poisoned "last good" state, strict JSON, the budget recorded is the budget run, full disks,
signals before training, file permissions."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, compose
from test_bad_inputs import BASE, one_line, run_main


def strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def run_ok(overrides: list[str], run_dir: Path):
    from triadapt.experiment import main

    return main(compose([*BASE, *overrides, f"+paths.run_dir={run_dir}"]))


# -- one writer per run dir ------------------------------------------------------------------

HOLD_LOCK = (
    "import sys, time; from triadapt.rundir import RunDirLock; RunDirLock(sys.argv[1]).acquire(); "
    "print('locked', flush=True); time.sleep(120)"
)


def hold_lock(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_refuses_a_locked_run_dir_then_takes_over_a_dead_holders_lock(tmp_path, tiny_glue_dir, capsys):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        code, err = run_main([f"data.dir={tiny_glue_dir}"], run_dir, capsys)
        line = one_line(err)
        assert code == 2 and f"{run_dir} is in use by pid {holder.pid} on {socket.gethostname()} since " in line
        assert "choose another run dir" in line
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing of the refused run
    finally:
        holder.kill()
        holder.wait()
    # The holder died without any clean-up: its lock is gone with it.
    run_ok([f"data.dir={tiny_glue_dir}"], run_dir)
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"
    assert f"pid {os.getpid()} on" in (run_dir / ".lock").read_text()


def test_two_runs_into_one_folder_one_refuses(tmp_path, tiny_glue_dir):
    """Two run.py processes on one run dir with other lr and rank (as two runs started in the same
    second under one default name): the second refuses in one line and writes nothing there."""
    run_dir = tmp_path / "run"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def start(*extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "run.py", *BASE, f"data.dir={tiny_glue_dir}", *extra, f"hydra.run.dir={run_dir}"]
        return subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)

    first = start("train.max_steps=100000", "train.lr=1e-3", "budget.rank=4")
    try:
        deadline = time.monotonic() + 120
        while (json.loads((run_dir / "result.json").read_text()) if (run_dir / "result.json").exists() else {}).get(
            "status"
        ) != "running":
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.05)
        before = (run_dir / "result.json").read_bytes()
        second = start("train.lr=2e-3", "budget.rank=8")
        assert second.wait(timeout=120) == 2
        line = one_line(second.stderr.read())
        assert f"{run_dir} is in use by pid {first.pid} on {socket.gethostname()}" in line
        assert (run_dir / "result.json").read_bytes() == before
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "interrupted" and result["config"]["train"]["lr"] == 1e-3
    assert result["config"]["method"]["r"] == 4


def test_a_sweep_job_whose_dir_is_locked_counts_as_failed(tmp_path, tiny_glue_dir):
    sweep = tmp_path / "smoke"
    locked = sweep / "method=lora,seed=2"
    holder = hold_lock(locked)
    try:
        env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(
            [sys.executable, "run.py", "-m", "experiment=smoke", "method=lora", "seed=1,2", f"data.dir={tiny_glue_dir}",
             f"paths.output_dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    summary = [line for line in proc.stdout.splitlines() if line.startswith("sweep summary")]
    assert proc.returncode == 1 and len(summary) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 jobs: 1 completed, 0 skipped, 1 failed: method=lora,seed=2 (RunDirBusy: " in summary[0]
    assert f"in use by pid {holder.pid}" in summary[0]
    assert not (locked / "result.json").exists()
    assert json.loads((sweep / "method=lora,seed=1" / "result.json").read_text())["status"] == "completed"


# -- last good state, strict JSON, budget name -----------------------------------------------


def test_a_non_finite_update_stops_and_names_the_last_finite_checkpoint(tmp_path, tiny_glue_dir, capsys, monkeypatch):
    """An update that poisons the weights (as train.lr=inf did) is caught right after it: no
    checkpoint, best adapter or final adapter of that state; the previous checkpoint is named."""
    from triadapt import train

    real_step = train.optimizer_step

    def poisoning_step(step, model, method, optimizer, scheduler):
        hook_s = real_step(step, model, method, optimizer, scheduler)
        if step == 2:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(float("inf"))
        return hook_s

    monkeypatch.setattr(train, "optimizer_step", poisoning_step)
    run_dir = tmp_path / "run"
    overrides = [f"data.dir={tiny_glue_dir}", "train.checkpoint_every=1", "train.keep_checkpoints=5", "train.eval_every=1"]
    code, err = run_main(overrides, run_dir, capsys)
    line = one_line(err)
    good = run_dir / "checkpoints" / "step-00000002.pt"
    assert code == 2 and "the update at step 2 made parameters or optimizer state non-finite" in line
    assert f"the last good state is {good}" in line
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000001.pt", "step-00000002.pt"]
    payload = torch.load(good, weights_only=False)
    assert all(torch.isfinite(t).all() for t in payload["model"].values())
    assert all(torch.isfinite(t).all() for s in payload["optimizer"]["state"].values() for t in s.values())
    assert all(torch.isfinite(t).all() for t in load_file(run_dir / "adapter_best.safetensors").values())
    assert [e["step"] for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "failed" and result["error"]["type"] == "TrainingDiverged"


def test_no_checkpoint_of_a_non_finite_state_is_ever_written(tmp_path, tiny_glue_dir, capsys, monkeypatch):
    """Without periodic checkpoints the message says there is none, and none is written."""
    from triadapt import train

    real_step = train.optimizer_step

    def poisoning_step(step, model, method, optimizer, scheduler):
        hook_s = real_step(step, model, method, optimizer, scheduler)
        for state in optimizer.state.values():  # the second moment overflowing, weights still finite
            state["exp_avg_sq"].fill_(float("nan"))
        return hook_s

    monkeypatch.setattr(train, "optimizer_step", poisoning_step)
    run_dir = tmp_path / "run"
    code, err = run_main([f"data.dir={tiny_glue_dir}"], run_dir, capsys)
    line = one_line(err)
    assert code == 2 and "the update at step 0 made" in line and "no checkpoint was saved before" in line
    assert not list(run_dir.glob("checkpoints/*")) and not list(run_dir.glob("adapter*"))


def test_constant_dev_labels_give_null_with_a_reason_and_strict_json(tmp_path, tiny_glue_dir):
    dev = tiny_glue_dir / "STS-B" / "dev.tsv"
    lines = dev.read_text(encoding="utf-8").splitlines(keepends=True)
    dev.write_text(lines[0] + "".join(line.rsplit("\t", 1)[0] + "\t2.000\n" for line in lines[1:]), encoding="utf-8")
    run_dir = tmp_path / "run"
    value = run_ok([f"data.dir={tiny_glue_dir}", "task=glue/stsb", "train.eval_every=2"], run_dir)
    result = strict_json((run_dir / "result.json").read_text())
    evals = [strict_json(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    main = result["main_metric"]
    assert result["status"] == "completed" and value is None
    assert result["metrics"]["best"] is None and result["metrics"]["best_step"] is None
    assert result["metrics"]["final"][main] is None and result["metrics"]["final"]["pearson"] is None
    assert [e["step"] for e in evals] == [2, 4]
    for e in evals:
        assert e["metrics"]["pearson"] is None and "constant labels" in e["undefined"]["pearson"]
    assert not (run_dir / "adapter_best.safetensors").exists()  # no evaluation was better than another
    assert (run_dir / "adapter.safetensors").exists()


def test_method_rank_overriding_the_budget_is_recorded_as_the_budget_run(tmp_path, tiny_glue_dir):
    run_ok([f"data.dir={tiny_glue_dir}", "method.r=2", "train.max_steps=1"], tmp_path / "r2")
    run_ok([f"data.dir={tiny_glue_dir}", "train.max_steps=1"], tmp_path / "r8")
    names = {d: json.loads((tmp_path / d / "result.json").read_text())["budget_name"] for d in ("r2", "r8")}
    assert names == {"r2": "r2", "r8": "r8"}


def test_budget_name_of_each_rank_setting():
    from triadapt.validation import budget_name

    assert budget_name(compose(["method=lora"])) == "r8"
    assert budget_name(compose(["method=lora", "budget=r2"])) == "r2"
    assert budget_name(compose(["method=triadapt", "method.target_rank=4"])) == "r4"
    assert budget_name(compose(["method=increlora", "method.target_total_rank=96"])) == "total96"
    assert budget_name(compose(["method=adalora", "budget=r4"])) == "r4"


# -- full disk (a small tmpfs) ---------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs mount point; ``resize(bytes)`` changes its size. Needs root (CI containers are)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("this container may not mount a tmpfs")

    def resize(nbytes: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={nbytes}", str(mnt)], check=True)

    try:
        yield mnt, resize
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_atomic_write_on_a_full_disk_is_one_line_and_keeps_the_old_file(small_fs):
    from triadapt.tracking import DiskFull, atomic_path, atomic_write_text

    mnt, resize = small_fs
    resize(64 * 1024)
    atomic_write_text(mnt / "result.json", "old\n")
    with pytest.raises(DiskFull) as info:
        atomic_write_text(mnt / "result.json", "x" * 200_000)
    message = str(info.value)
    assert f"disk full writing {mnt / 'result.json'}: it needs about 195.3 KiB, " in message and "\n" not in message
    assert (mnt / "result.json").read_text() == "old\n" and sorted(os.listdir(mnt)) == ["result.json"]
    with pytest.raises(DiskFull, match="checkpoint.pt: it needs about 3.8 MiB"):  # torch's own writer
        with atomic_path(mnt / "checkpoint.pt", need_bytes=4_000_000) as tmp:
            torch.save({"w": torch.zeros(1_000_000)}, tmp)
    assert sorted(os.listdir(mnt)) == ["result.json"]


def test_the_final_status_is_recorded_on_a_disk_with_no_room_for_a_copy(small_fs):
    from triadapt.experiment import _record_status
    from triadapt.tracking import DiskFull, atomic_write_json

    mnt, resize = small_fs
    resize(64 * 1024)
    record = {"status": "running", "error": None, "config": {"x": "y" * 3000}}
    atomic_write_json(mnt / "result.json", record)
    with open(mnt / "filler", "wb", buffering=0) as f:  # fill every free page
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    failed = record | {"status": "failed", "error": {"type": "DiskFull", "message": "disk full writing …"}}
    with pytest.raises(DiskFull):  # no room for the atomic copy
        atomic_write_json(mnt / "result.json", failed)
    _record_status(mnt, failed)  # in place instead
    assert strict_json((mnt / "result.json").read_text()) == failed
    assert sorted(os.listdir(mnt)) == ["filler", "result.json"]


def test_a_full_disk_at_the_final_write_leaves_a_resumable_run(small_fs, tmp_path, tiny_glue_dir, capsys, monkeypatch):
    """checkpoint_every=0 and the disk fills while writing the final adapter: one line, status
    failed, and the end-of-run checkpoint resumes to the result of an uninterrupted run."""
    from triadapt import train

    mnt, resize = small_fs
    args = [f"data.dir={tiny_glue_dir}", "train.eval_every=2"]
    sizes = {}
    real_save = train.Trainer.save_checkpoint

    def measured_save(self, prune=True):
        path = real_save(self, prune)
        sizes[path.name] = path.stat().st_size
        return path

    monkeypatch.setattr(train.Trainer, "save_checkpoint", measured_save)
    ref = tmp_path / "ref"
    run_ok(args, ref)
    assert not (ref / "checkpoints").exists()  # the end-of-run checkpoint is gone once complete
    page = 4096

    def pages(n: int) -> int:
        return -(-n // page)

    # Room for what exists before the final writes (the end-of-run checkpoint included), and
    # two pages: the final adapter (10 pages) or the last best adapter does not fit.
    before_final = sum(pages(p.stat().st_size) for p in ref.iterdir() if p.name != "adapter.safetensors")
    before_final += pages(sizes["step-00000004.pt"])
    assert pages((ref / "adapter.safetensors").stat().st_size) > 4
    resize((before_final + 2) * page)

    run_dir = mnt / "run"
    code, err = run_main(args, run_dir, capsys)
    line = one_line(err)
    assert code == 2 and f"disk full writing {run_dir}/adapter" in line and "it needs about " in line
    assert "run the same command again" in line
    result = strict_json((run_dir / "result.json").read_text())
    assert result["status"] == "failed" and result["error"]["type"] == "DiskFull"
    assert (run_dir / "checkpoints" / "step-00000004.pt").exists() and not (run_dir / "adapter.safetensors").exists()

    resize(64 * 2**20)  # space freed: the same command finishes the run
    run_ok(args, run_dir)
    got, want = (json.loads((d / "result.json").read_text()) for d in (run_dir, ref))
    assert got["status"] == "completed" and got["metrics"] == want["metrics"]
    a, b = load_file(run_dir / "adapter.safetensors"), load_file(ref / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (run_dir / "checkpoints").exists()


# -- signals before training, permissions ----------------------------------------------------


def test_sigterm_while_loading_data_records_interrupted(tmp_path, tiny_glue_dir, capsys, monkeypatch):
    from triadapt import experiment

    real_build = experiment.build_task

    def build_then_signal(*a, **k):
        task = real_build(*a, **k)
        os.kill(os.getpid(), signal.SIGTERM)  # as SLURM's scancel during tokenisation
        time.sleep(1)
        return task

    monkeypatch.setattr(experiment, "build_task", build_then_signal)
    handler = signal.getsignal(signal.SIGTERM)
    run_dir = tmp_path / "run"
    code, err = run_main([f"data.dir={tiny_glue_dir}"], run_dir, capsys)
    error, resume = [line for line in err.splitlines() if line.strip()]  # the error, then how to resume
    assert error.startswith("interrupted: ") and "Traceback" not in err
    line = error
    assert resume.startswith("resume: python ") and resume.endswith(f"resume={run_dir}")
    assert code == 130 and f"stopped by signal {int(signal.SIGTERM)} outside the training loop" in line
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "interrupted" and result["error"]["type"] == "Interrupted"
    assert signal.getsignal(signal.SIGTERM) == handler  # restored


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_files_get_the_permissions_of_the_umask(tmp_path, tiny_glue_dir, umask, mode):
    old = os.umask(umask)
    try:
        run_dir = tmp_path / "run"
        run_ok([f"data.dir={tiny_glue_dir}", "train.max_steps=2", "train.checkpoint_every=1"], run_dir)
    finally:
        os.umask(old)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"result.json", "metrics.jsonl", "adapter.safetensors", "step-00000001.pt", ".lock"} <= {p.name for p in files}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(mode) for p in files}
