"""Run outputs: atomic file writes, ``result.json``, ``metrics.jsonl`` and W&B.

Every file is written to a temporary sibling and moved into place with ``os.replace``,
so a kill at any moment leaves either the old or the new complete file. Files get the
permissions the umask gives an ordinary file (not the 0600 of temporary files), so that
colleagues on a shared cluster can read them. A full disk is one line (:class:`DiskFull`)
naming the file and the space it needs; the previous version of the file stays intact.

JSON files are strict JSON: a non-finite number (a correlation over constant labels) is
written as ``null``; the evaluation record says why (see ``Trainer.evaluate``).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from triadapt.errors import ConfigError, TriadaptError

RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
WANDB_MODES = ("online", "offline", "disabled")
log = logging.getLogger("triadapt")


class DiskFull(TriadaptError):
    """No space left (or quota exceeded) while writing a run file."""


def _umask() -> int:
    try:  # Linux ≥ 4.7: read it without changing it (os.umask would race with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _disk_full(e: BaseException, folder: Path, need: int | None) -> bool:
    """ENOSPC/EDQUOT, also when a C++/Rust writer (torch, safetensors) hides it in another error
    ("iostream error"): then the free space (temp file removed) tells, being below the need."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(seen) for s in ("No space left", "code: 28,", "Disk quota exceeded")):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < max(need or 0, 1 << 16)
    except OSError:
        return False


@contextmanager
def atomic_path(path: str | Path, need_bytes: int | None = None):
    """Yield a temporary path next to ``path``; once written, flush it to disk and move it over ``path``.

    The temp name starts with a dot and ends in ``.tmp``, so no reader globbing ``step-*.pt``
    or ``result.json`` ever picks up a half-written file. ``need_bytes`` (the expected size)
    only sharpens the message of a full disk.
    """
    path = Path(path)
    tmp = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except Exception as e:
            if isinstance(e, TriadaptError):
                raise
            written = os.path.getsize(tmp) if tmp and os.path.exists(tmp) else 0
            if tmp and os.path.exists(tmp):
                os.unlink(tmp)
            if not _disk_full(e, path.parent, need_bytes):
                raise
            try:
                free = _human(shutil.disk_usage(path.parent).free)
            except OSError:
                free = "unknown"
            need = f"about {_human(need_bytes)}" if need_bytes else f"more than the {_human(written)} written"
            raise DiskFull(
                f"disk full writing {path}: it needs {need}, {free} free on that filesystem; "
                "free space (or set paths.output_dir elsewhere) and run the same command again"
            ) from None
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    data = text.encode("utf-8")
    with atomic_path(path, len(data)) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, to_json(obj, indent=2) + "\n")


def to_json(obj: Any, indent: int | None = None) -> str:
    """Strict JSON (RFC 8259): NaN and ±inf become ``null``."""
    return json.dumps(_finite(obj), indent=indent, default=_json_default, allow_nan=False)


def _finite(o):
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if hasattr(o, "item") and getattr(o, "ndim", 0) == 0:  # numpy / torch scalars
        return _finite(o.item())
    return o


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_status_in_place(path: str | Path, obj: Any) -> None:
    """Last resort when an atomic write of the final status failed (full disk): overwrite the
    file in place, which needs no second copy's worth of space. Not atomic; used only where the
    alternative is a stale ``running``."""
    data = (to_json(obj, indent=2) + "\n").encode("utf-8")
    with open(path, "r+b" if os.path.exists(path) else "wb") as f:
        f.truncate(0)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_result(run_dir: str | Path) -> dict | None:
    """The run's result.json, or None when absent, unreadable or not a JSON object."""
    try:
        result = json.loads((Path(run_dir) / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: bad JSON or bad UTF-8
        return None
    return result if isinstance(result, dict) else None


def write_metrics_log(run_dir: str | Path, records: list[dict]) -> None:
    """Rewrite metrics.jsonl whole (it is small), so no half line survives a kill."""
    atomic_write_text(Path(run_dir) / METRICS_FILE, "".join(to_json(r) + "\n" for r in records))


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
