"""triadapt: a benchmark harness for adaptive-rank parameter-efficient fine-tuning."""

__version__ = "0.1.0"

from omegaconf import OmegaConf

# Job folder names come from override strings; "glue/mrpc" must not create a sub-folder.
OmegaConf.register_new_resolver("triadapt.dirname", lambda s: s.replace("/", "-"), replace=True)
