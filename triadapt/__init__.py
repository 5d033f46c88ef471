"""triadapt: a benchmark harness for adaptive-rank parameter-efficient fine-tuning."""

__version__ = "0.1.0"
