"""triadapt: a benchmark harness for adaptive-rank parameter-efficient fine-tuning."""

__version__ = "0.1.0"

import secrets

from omegaconf import OmegaConf

# Job folder names come from override strings; "glue/mrpc" must not create a sub-folder.
OmegaConf.register_new_resolver("triadapt.dirname", lambda s: s.replace("/", "-"), replace=True)
# Part of a default run dir name: two runs started in the same second get different folders.
# Cached, so every use within one process sees the same value.
OmegaConf.register_new_resolver("triadapt.run_id", lambda: secrets.token_hex(3), replace=True, use_cache=True)


def _sweep_name(experiment, experiment_name, overrides, started) -> str:
    """The folder every job of a multirun shares, so it must not depend on what is swept:
    a named experiment (or an explicit ``experiment_name=…``) keeps its stable folder, where
    re-running resumes the sweep; an ad-hoc sweep gets ``multirun/<start time>`` (``now`` is
    resolved once and shared by all jobs)."""
    named = any(str(o).lstrip("+~").split("=", 1)[0] == "experiment_name" for o in overrides or [])
    return str(experiment_name) if experiment or named else f"multirun/{started}"


OmegaConf.register_new_resolver("triadapt.sweep_name", _sweep_name, replace=True)
