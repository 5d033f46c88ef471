"""Run outputs: atomic file writes, ``result.json``, ``metrics.jsonl`` and W&B.

Every file is written to a temporary sibling and moved into place with ``os.replace``,
so a kill at any moment leaves either the old or the new complete file.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from triadapt.errors import ConfigError

RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
WANDB_MODES = ("online", "offline", "disabled")
log = logging.getLogger("triadapt")


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; once written, flush it to disk and move it over ``path``.

    The temp name starts with a dot and ends in ``.tmp``, so no reader globbing ``step-*.pt``
    or ``result.json`` ever picks up a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_result(run_dir: str | Path) -> dict | None:
    """The run's result.json, or None when absent or unreadable."""
    try:
        return json.loads((Path(run_dir) / RESULT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_metrics_log(run_dir: str | Path, records: list[dict]) -> None:
    """Rewrite metrics.jsonl whole (it is small), so no half line survives a kill."""
    atomic_write_text(Path(run_dir) / METRICS_FILE, "".join(json.dumps(r, default=_json_default) + "\n" for r in records))


_PACKAGES = ("torch", "transformers", "datasets", "peft", "hydra-core", "numpy", "triadapt")


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_sha() -> str | None:
    try:
        repo = Path(__file__).resolve().parents[1]
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


class Tracker:
    """W&B when configured, otherwise nothing.

    W&B failing to start never fails the run: online falls back to offline (one warning), and
    offline failing turns logging off. An unreachable server is given up after W&B's
    ``init_timeout`` (90 s; set ``WANDB_INIT_TIMEOUT`` to shorten it), once per process: the
    next jobs of a sweep in the same process log offline straight away.
    """

    _online_failed = False  # per process

    def __init__(self, logger_cfg, run_dir: Path, config: dict, name: str) -> None:
        self.run = None
        mode = logger_cfg.get("mode")
        if logger_cfg.name != "wandb" or mode == "disabled":
            return
        if mode not in WANDB_MODES:
            raise ConfigError(f"logger.mode={mode!r}; choose {', '.join(WANDB_MODES)} (or logger=none)")
        import wandb

        kwargs = dict(
            project=logger_cfg.project,
            entity=logger_cfg.get("entity"),
            group=logger_cfg.get("group"),
            tags=list(logger_cfg.get("tags") or []),
            name=name,
            job_type="train",
            config=config,
            dir=str(run_dir),
            reinit="finish_previous",
        )
        os.environ.setdefault("WANDB_SILENT", "true")
        if mode == "online" and Tracker._online_failed:
            mode = "offline"
            log.warning("W&B online failed earlier in this process; logging offline")
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as e:  # no API key, no network, bad entity …
            if mode == "offline":
                log.warning("W&B failed to start (%s); W&B logging disabled for this run", _one_line(e))
                return
            Tracker._online_failed = True
            log.warning(
                "W&B failed to start online (%s); logging offline instead (check WANDB_API_KEY or `wandb login` "
                "and the network, then `wandb sync %s`)", _one_line(e), Path(run_dir) / "wandb",
            )
            try:
                self.run = wandb.init(mode="offline", **kwargs)
            except Exception as e2:
                log.warning("W&B offline also failed (%s); W&B logging disabled for this run", _one_line(e2))
                return
        for key in ("eval/*",):
            self.run.define_metric(key, summary="max")

    def log(self, values: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))}, step=step)

    def finish(self, exit_code: int = 0) -> None:
        """Close the W&B run; a W&B error here is logged, never raised (the run's outcome stands)."""
        if self.run is not None:
            run, self.run = self.run, None
            try:
                run.finish(exit_code=exit_code)
            except Exception as e:
                log.warning("W&B failed to finish (%s)", _one_line(e))


def _one_line(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__
