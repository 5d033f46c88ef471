"""What ``run.py`` does before Hydra composes anything: decide once whether the hub is reachable,
and rewrite the command-line shortcuts (``task=mrpc``, ``resume=<run dir>``) into plain overrides.

Kept free of heavy imports: the hub decision must be taken before transformers, datasets or
huggingface_hub are imported, since they read ``HF_HUB_OFFLINE`` once, at import.
"""

from __future__ import annotations

import os
import shlex
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

from omegaconf import OmegaConf

#: seconds the hub gets to answer before the run goes on offline
HUB_PROBE_TIMEOUT = 3.0
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class UsageError(Exception):
    """A command line that cannot be turned into overrides: printed as one line, exit 2."""


def hub_reachable(endpoint: str, timeout: float = HUB_PROBE_TIMEOUT) -> tuple[bool, str]:
    """One HEAD request, abandoned after ``timeout`` seconds (DNS included): (reachable, why not)."""
    outcome: list[tuple[bool, str]] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            outcome.append((True, ""))
        except urllib.error.HTTPError:  # the server answered
            outcome.append((True, ""))
        except Exception as e:
            outcome.append((False, f"{type(e).__name__}: {getattr(e, 'reason', e)}"))

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else (False, f"no answer within {timeout:.0f} s")


def settle_hub_access() -> None:
    """Unless ``HF_HUB_OFFLINE`` is set either way, probe the hub once; when it does not answer,
    say so in one line and go offline, so that no later download stalls on retries.
    Local data and packaged models need no hub at all."""
    if os.environ.get("HF_HUB_OFFLINE") is not None:
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    ok, why = hub_reachable(endpoint)
    if ok:
        return
    for var in _OFFLINE_VARS:
        os.environ[var] = "1"
    print(f"hub: {endpoint} unreachable ({why}); working offline (HF_HUB_OFFLINE=1 skips this check)",
          file=sys.stderr, flush=True)


def _short_task(value: str, conf_dir: Path) -> str:
    if "/" in value or (conf_dir / "task" / f"{value}.yaml").is_file():
        return value
    if (conf_dir / "task" / "glue" / f"{value}.yaml").is_file():
        return f"glue/{value}"
    names = sorted(
        [p.stem for p in (conf_dir / "task" / "glue").glob("*.yaml")] + [p.stem for p in (conf_dir / "task").glob("*.yaml")]
    )
    raise UsageError(f"unknown task {value!r}; choose one of {', '.join(names)} (GLUE tasks also as glue/<name>)")


def _key(arg: str) -> str:
    return arg.lstrip("+~").split("=", 1)[0]


def resume_overrides(run_dir: Path) -> list[str]:
    """The overrides a run was started with, read from its ``.hydra/overrides.yaml``."""
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not run_dir.is_dir():
        raise UsageError(f"resume={run_dir}: no such run dir; resume= takes auto, true, false or a run dir")
    if not saved.is_file():
        raise UsageError(f"resume={run_dir}: not a run dir ({saved} is missing); pass the folder that holds .hydra/")
    return [str(o) for o in OmegaConf.load(saved) or []]


def prepare_argv(argv: list[str], conf_dir: Path) -> list[str]:
    """``task=mrpc`` → ``task=glue/mrpc`` (lists too: ``task=mrpc,rte``); ``resume=<run dir>`` →
    the overrides that run was started with, its folder as ``hydra.run.dir`` and ``resume=auto``
    (continue from its checkpoint if it holds one). Overrides given beside ``resume=<dir>`` win."""
    args = list(argv[1:])
    for i, arg in enumerate(args):
        if _key(arg) == "task" and "=" in arg and "(" not in arg:
            head, value = arg.split("=", 1)
            args[i] = f"{head}={','.join(_short_task(v, conf_dir) for v in value.split(','))}"
    resume = [a for a in args if a.startswith("resume=") and a.split("=", 1)[1].lower() not in ("auto", "true", "false")]
    if resume:
        run_dir = Path(resume[-1].split("=", 1)[1]).expanduser()
        given = [a for a in args if not a.startswith("resume=")]
        given_keys = {_key(a) for a in given if "=" in a}
        saved = [o for o in resume_overrides(run_dir) if _key(o) not in given_keys | {"resume"}]
        args = [*saved, *given, f"hydra.run.dir={run_dir}", "resume=auto"]
    return [argv[0], *args]


def resume_command(run_dir: Path) -> str:
    """The command that continues a run from its folder."""
    return f"python {shlex.quote(sys.argv[0] or 'run.py')} resume={shlex.quote(str(run_dir))}"
