"""The README's run commands are tests: every ``python run.py …`` line of a ```bash block in
README.md, plus the design card's ``python run.py method=triadapt task=glue/mrpc``, runs exactly
as written — default pretrained MiniLM, paper presets, real data — and must compose, load its
model and data, and train.

How a command is bounded without touching its configuration: the test-only environment variable
``TRIADAPT_STOP_AFTER_STEPS=N`` makes the loop stop after N steps as SIGINT would (checkpoint,
``result.json`` says ``interrupted``, exit 130, the resume command printed). The commands run
in a scratch folder holding links to ``run.py`` and ``conf/`` (their ``outputs/`` and
``results/`` land there) beside a ``shared/data`` link to the real data, so that
``data.dir=../shared/data`` means what it means in this checkout; ``TRIADAPT_DATA_DIR`` points at
the same data root, as the README's ``export`` line says.

Commands that need the hub (``model=deberta_v3_base``, ``bert_base_uncased``) run offline against
an HF cache (``HF_HUB_CACHE``) holding tiny checkpoints saved under those hub ids: the real hub
code path, a tiny model. ``launcher=slurm`` lines are composed and expanded into their jobs, not
submitted: CI has no cluster. A README edit that breaks a command fails here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import CONF, REPO, SHARED_DATA, hub_cache_with

DESIGN_CARD_COMMAND = "python run.py method=triadapt task=glue/mrpc"
HUB_MODELS = {
    "microsoft/deberta-v3-base": "deberta-v2", "google-bert/bert-base-uncased": "bert",
    "meta-llama/Llama-3.2-1B": "llama", "Qwen/Qwen2.5-0.5B": "qwen2",
}  # fmt: skip
STOP_AFTER = 1


def _args(command: str) -> list[str]:
    argv = shlex.split(command, comments=True)
    assert argv[:2] == ["python", "run.py"], command
    return argv[2:]


def readme_commands() -> list[str]:
    commands, in_bash, pending = [], False, ""
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_bash, pending = line.strip() == "```bash", ""
            continue
        if not in_bash:
            continue
        line = pending + line.strip()
        if line.endswith("\\"):  # a command continued on the next line
            pending = line[:-1] + " "
            continue
        pending = ""
        if line.startswith("python run.py"):
            commands.append(line)
    return commands


COMMANDS = readme_commands()
if not any(c.split("#")[0].split() == DESIGN_CARD_COMMAND.split() for c in COMMANDS):
    COMMANDS.append(DESIGN_CARD_COMMAND)


def test_the_readme_has_the_commands_users_type():
    assert len(COMMANDS) >= 8
    assert any(c.split("#")[0].split() == DESIGN_CARD_COMMAND.split() for c in readme_commands())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_checkpoints) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("readme")
    work = root / "checkout"
    work.mkdir()
    (work / "run.py").symlink_to(REPO / "run.py")
    (work / "conf").symlink_to(CONF, target_is_directory=True)
    (root / "shared").mkdir()
    (root / "shared" / "data").symlink_to(SHARED_DATA, target_is_directory=True)
    cache = hub_cache_with({hub_id: tiny_checkpoints[arch] for hub_id, arch in HUB_MODELS.items()}, root / "hf-cache")
    env = os.environ | {
        "TRIADAPT_DATA_DIR": str(root / "shared" / "data"),
        "TRIADAPT_STOP_AFTER_STEPS": str(STOP_AFTER),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    return work, env


def _composed_only(args: list[str]) -> None:
    """A SLURM sweep: its config composes and every job of the sweep resolves."""
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
        assert cfg.hydra.runtime.choices["hydra/launcher"] == "triadapt_slurm"
        params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
        jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)[0]
        assert jobs
        for job in (jobs[0], jobs[-1]):
            job_cfg = hydra_compose("config", overrides=[*overrides, *job])
            OmegaConf.to_container(job_cfg, resolve=True)


@pytest.mark.slow
@pytest.mark.skipif(SHARED_DATA is None, reason="real data folder (../shared/data) not present")
@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[" ".join(_args(c)) for c in COMMANDS])
def test_readme_command_trains_as_written(index, workspace):
    command = COMMANDS[index]
    args = _args(command)
    if any(a.startswith("launcher=slurm") for a in args):
        _composed_only(args)
        return
    work, env = workspace
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    # stopped by the test-only limit after its first steps, not by an error
    assert proc.returncode == 130, f"{command}\n{out[-4000:]}"
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("error: ", "interrupted: "))]
    assert errors and all(f"stopped by TRIADAPT_STOP_AFTER_STEPS={STOP_AFTER}" in e for e in errors), out[-4000:]
    assert "train features" in out and "trainable params" in out, out[-4000:]  # model and data loaded
    resume = re.findall(r"^resume: python run\.py resume=(.+)$", proc.stderr, flags=re.M)
    assert resume, out[-4000:]
    for shown in resume:
        run_dir = work / shlex.split(shown)[0]
        result = json.loads((run_dir / "result.json").read_text())
        assert result["status"] == "interrupted" and result["error"]["type"] == "Interrupted"
        assert list((run_dir / "checkpoints").glob("step-*.pt")), "trained steps are checkpointed"
        # composed from exactly the command's overrides
        saved = [str(o) for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")]
        given = [a for a in args if a not in ("-m", "--multirun") and not a.startswith("hydra.")]
        if "-m" not in args:
            assert [o.replace("task=glue/", "task=") for o in saved] == [a.replace("task=glue/", "task=") for a in given]
        cfg = result["config"]
        for arg in given:
            key, value = arg.split("=", 1)
            if key in ("method", "model"):
                assert cfg[key]["name"] == value
    if any(_args(c) == args for c in COMMANDS[:index]):
        assert "resumed from" in out  # the same command again continues the run


def test_hub_command_offline_without_the_model_is_one_line(tmp_path):
    """The README's DeBERTaV3 command where the hub is out of reach and the cache lacks the model."""
    (hub_command,) = [c for c in COMMANDS if "model=deberta_v3_base" in c]
    (tmp_path / "run.py").symlink_to(REPO / "run.py")
    (tmp_path / "conf").symlink_to(CONF, target_is_directory=True)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "run.py", *_args(hub_command)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot load tokenizer 'microsoft/deberta-v3-base'")
    assert "use model=minilm_l6 offline" in lines[0] and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("outputs/**/*"))  # no run dir left behind
