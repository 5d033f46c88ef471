"""``python -m triadapt.bench``: see :mod:`triadapt.bench.cli`."""

from triadapt.bench.cli import run

run()
