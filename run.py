"""Run one experiment: `python run.py method=triadapt task=glue/mrpc` (see README)."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from triadapt.cli import UsageError, prepare_argv, settle_hub_access

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from triadapt.experiment import main as run_experiment  # after settle_hub_access: HF reads its mode at import

    return run_experiment(cfg)


if __name__ == "__main__":
    settle_hub_access()
    try:
        sys.argv = prepare_argv(sys.argv, CONF)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
