"""triadapt: a benchmark harness for adaptive-rank parameter-efficient fine-tuning."""

__version__ = "0.1.0"

import secrets
import time

from omegaconf import OmegaConf

# Job folder names come from override strings; "glue/mrpc" must not create a sub-folder.
OmegaConf.register_new_resolver("triadapt.dirname", lambda s: s.replace("/", "-"), replace=True)
# Part of a default run dir name: two runs started in the same second get different folders.
# Cached, so every use within one process sees the same value.
OmegaConf.register_new_resolver("triadapt.run_id", lambda: secrets.token_hex(3), replace=True, use_cache=True)


def _sweep_name(*, _root_) -> str:
    """The folder every job of a multirun shares. Resolved once in the launching process and
    cached (Hydra copies the cache into each job's config), so it never depends on what is swept:
    a named experiment (or an explicit ``experiment_name=…``) keeps its stable folder, where
    re-running resumes the sweep; an ad-hoc sweep gets ``multirun/<start time>``."""
    choices = OmegaConf.select(_root_, "hydra.runtime.choices") or {}
    overrides = OmegaConf.select(_root_, "hydra.overrides.task") or []
    named = any(str(o).lstrip("+~").split("=", 1)[0] == "experiment_name" for o in overrides)
    if choices.get("experiment") or named:
        return str(_root_.experiment_name)
    return f"multirun/{time.strftime('%Y%m%d-%H%M%S')}"


OmegaConf.register_new_resolver("triadapt.sweep_name", _sweep_name, replace=True, use_cache=True)
