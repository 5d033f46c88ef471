"""Run one experiment: `python run.py method=triadapt task=glue/mrpc` (see README)."""

import hydra
from omegaconf import DictConfig

from triadapt.experiment import main as run_experiment


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return run_experiment(cfg)


if __name__ == "__main__":
    main()
