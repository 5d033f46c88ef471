"""The front door (issue #11): what a user meets around a run — run dir named at start and end,
one-line errors for unexpected exceptions too, progress lines off a terminal, resume by folder,
one folder per sweep, nothing left by a rejected command, the hub decided once, one data root,
short task names, unique default run dirs. Tiny models and hand-made data: seconds each."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CONF, REPO, compose
from triadapt.cli import UsageError, hub_reachable, prepare_argv

BASE = ["logger=none", "hparams=none", "model=tiny_bert", "task=glue/mrpc", "train.batch_size=8"]


def run_py(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = (env if env is not None else dict(os.environ)) | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


# -- unexpected errors: one line, traceback in the run dir, debug=true raises ----------------


def test_unexpected_error_is_one_line_with_traceback_in_the_run_dir(tmp_path, tiny_glue_dir, capsys, monkeypatch):
    import triadapt.experiment as experiment

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(experiment, "_train", broken)
    run_dir = tmp_path / "run"
    cfg = compose([*BASE, f"data.dir={tiny_glue_dir}", "train.max_steps=2", f"+paths.run_dir={run_dir}"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        experiment.main(cfg)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    (line,) = error_lines(err)
    assert line.startswith("error: RuntimeError: boom second line") and "error.log" in line and "Traceback" not in err
    assert f"resume: python {shlex.quote(sys.argv[0])} resume=" in err
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "failed" and result["error"]["type"] == "RuntimeError"
    log = (run_dir / "error.log").read_text()
    assert "Traceback" in log and "RuntimeError: boom" in log

    with pytest.raises(RuntimeError):  # debug=true: the exception itself
        experiment.main(compose([*BASE, f"data.dir={tiny_glue_dir}", "debug=true", f"+paths.run_dir={tmp_path / 'r2'}"]))


# -- one run through run.py, output to a file: run dir, progress lines, resume by folder ----


@pytest.mark.slow
def test_progress_lines_off_a_terminal_and_run_dir_at_start_and_end(tmp_path, tiny_glue_dir):
    with open(tmp_path / "log", "w") as out:  # as under SLURM / nohup / `> log`
        proc = subprocess.run(
            [sys.executable, "run.py", *BASE, f"data.dir={tiny_glue_dir}", "train.max_steps=30", "train.log_every=10",
             f"paths.output_dir={tmp_path / 'outputs'}"],
            cwd=REPO, env=os.environ | {"OMP_NUM_THREADS": "1"}, stdout=out, stderr=subprocess.STDOUT, timeout=300,
        )
    text = (tmp_path / "log").read_text()
    assert proc.returncode == 0, text[-3000:]
    progress = re.findall(r"step (\d+)/30 \(\d+%\) \| epoch [\d.]+/[\d.]+ \| loss [\d.]+ \| lr [\d.e+-]+ \| [\d.]+ s/step \| ETA \d+:\d\d:\d\d", text)
    assert [int(s) for s in progress] == [10, 20, 30]
    dirs = re.findall(r"run dir: (\S+)", text)
    assert len(dirs) == 2 and dirs[0] == dirs[1] and "(completed)" in text
    assert json.loads((Path(dirs[0]) / "result.json").read_text())["status"] == "completed"
    assert "\r" not in text  # no progress bar drawn into the file


@pytest.mark.slow
def test_interrupted_run_prints_the_command_that_resumes_it_by_folder(tmp_path, tiny_glue_dir):
    args = [*BASE, f"data.dir={tiny_glue_dir}", "train.max_steps=6", "paths.output_dir=out"]
    env = os.environ | {"TRIADAPT_STOP_AFTER_STEPS": "2"}
    first = run_py(*args, cwd=tmp_path, env=env)
    assert first.returncode == 130, first.stderr[-2000:]
    (line,) = re.findall(r"^resume: (.+)$", first.stderr, flags=re.M)
    argv = shlex.split(line)
    assert argv[0] == "python" and argv[2].startswith("resume=out/runs/mrpc/lora-r8-seed42-")
    run_dir = tmp_path / argv[2].split("=", 1)[1]
    assert json.loads((run_dir / "result.json").read_text())["status"] == "interrupted"

    env.pop("TRIADAPT_STOP_AFTER_STEPS")
    second = run_py(*argv[2:], cwd=tmp_path, env=env)  # exactly what was printed, by folder only
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout + second.stderr and "at step 2/6" in second.stdout + second.stderr
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["timing"]["steps"] == 6
    assert len(list((tmp_path / "out" / "runs" / "mrpc").iterdir())) == 1  # no second folder


def test_resume_of_a_folder_that_is_not_a_run_dir(tmp_path):
    for target, needle in ((tmp_path / "nowhere", "no such run dir"), (tmp_path, "not a run dir")):
        proc = run_py(f"resume={target}", cwd=tmp_path)
        assert proc.returncode == 2
        assert error_lines(proc.stderr) == [line for line in proc.stderr.splitlines() if line.strip()]
        assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_prepare_argv_resume_keeps_the_saved_overrides_and_lets_new_ones_win(tmp_path):
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "overrides.yaml").write_text("- method=lora\n- train.max_steps=6\n- resume=auto\n")
    argv = prepare_argv(["run.py", f"resume={tmp_path / 'run'}", "train.device=cpu"], CONF)
    assert argv == ["run.py", "method=lora", "train.max_steps=6", "train.device=cpu", f"hydra.run.dir={tmp_path / 'run'}", "resume=auto"]
    assert prepare_argv(["run.py", "resume=true", "task=rte"], CONF) == ["run.py", "resume=true", "task=glue/rte"]


# -- short task names --------------------------------------------------------------------------


def test_short_task_names():
    glue = sorted(p.stem for p in (CONF / "task" / "glue").glob("*.yaml"))
    assert {"mrpc", "rte", "cola", "sst2", "stsb", "mnli", "qnli", "qqp"} <= set(glue)
    for name in glue:
        assert prepare_argv(["run.py", f"task={name}"], CONF) == ["run.py", f"task=glue/{name}"]
    assert prepare_argv(["run.py", "-m", "task=mrpc,glue/rte,squad_v2"], CONF) == ["run.py", "-m", "task=glue/mrpc,glue/rte,squad_v2"]
    with pytest.raises(UsageError, match=r"unknown task 'mrcp'; choose one of cola, .*mrpc.*squad_v2.* glue/<name>"):
        prepare_argv(["run.py", "task=mrcp"], CONF)


# -- rejected commands leave nothing -----------------------------------------------------------


@pytest.mark.parametrize("bad", ["train.lr=0", "budget.rank=0"])
def test_rejected_command_leaves_no_run_dir(bad, tmp_path, tiny_glue_dir):
    proc = run_py(*BASE, f"data.dir={tiny_glue_dir}", bad, f"paths.output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1
    assert not list((tmp_path / "out").rglob("*"))  # Hydra's run dir (config, log) removed again


# -- sweeps ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_over_methods_lands_in_one_folder_and_the_report_sees_every_job(tmp_path, tiny_glue_dir):
    from triadapt.report import load_results

    out = tmp_path / "out"
    proc = run_py("-m", *BASE, f"data.dir={tiny_glue_dir}", "train.max_steps=4", "method=lora,adalora",
                  f"paths.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = list(out.iterdir())
    (sweep_dir,) = list(sweep.iterdir())  # multirun/<start time>
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2 and [re.search(r"method=(\w+)", j).group(1) for j in jobs] == ["adalora", "lora"]
    assert f"sweep summary ({sweep_dir.resolve()}): 2 jobs: 2 completed" in proc.stdout
    df, problems = load_results(sweep_dir)
    assert sorted(df["method"]) == ["adalora", "lora"] and not problems


# -- hub decided once --------------------------------------------------------------------------


@pytest.mark.slow
def test_unreachable_hub_is_decided_once_and_the_run_goes_on_offline(tmp_path, tiny_glue_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there
    proc = run_py(*BASE, f"data.dir={tiny_glue_dir}", "train.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hub_lines = [line for line in proc.stderr.splitlines() if "127.0.0.1:9" in line]
    assert len(hub_lines) == 1 and "unreachable" in hub_lines[0] and "working offline" in hub_lines[0]
    assert "retry" not in proc.stderr.lower()


def test_hub_probe_answers_within_its_timeout():
    ok, why = hub_reachable("http://127.0.0.1:9", timeout=1.0)
    assert not ok and why


# -- data root: glue/ and squad_v2/ under one folder, or the GLUE root -------------------------


def test_data_dir_may_be_the_root_holding_glue(tmp_path, tiny_glue_dir, capsys):
    from triadapt.experiment import main

    run_dir = tmp_path / "run"
    main(compose([*BASE, f"data.dir={tiny_glue_dir.parent}", "train.max_steps=2", f"+paths.run_dir={run_dir}"]))
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["data"]["source"] == f"local:{tiny_glue_dir}"


def test_missing_task_folder_names_both_layouts(tmp_path, tiny_glue_dir, capsys):
    from triadapt.experiment import main

    cfg = compose([*BASE, "task=glue/rte", f"data.dir={tiny_glue_dir.parent}", f"+paths.run_dir={tmp_path / 'run'}"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(cfg)
    (line,) = error_lines(capsys.readouterr().err)
    assert f"task folder {tiny_glue_dir}/RTE not found" in line
    assert "data root holding glue/ and squad_v2/" in line and "GLUE root holding the task folders (RTE/)" in line


# -- default run dirs are unique ---------------------------------------------------------------


def test_default_run_dirs_of_runs_started_together_differ():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        dirs = [OmegaConf.select(hydra_compose("config", return_hydra_config=True), "hydra.run.dir") for _ in range(2)]
    assert dirs[0] != dirs[1]
    assert all(re.fullmatch(r"outputs/runs/mrpc/lora-r8-seed42-\d{8}-\d{6}-[0-9a-f]{6}", d) for d in dirs)
