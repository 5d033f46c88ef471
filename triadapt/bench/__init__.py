"""Adapter overhead benchmark: ``python -m triadapt.bench`` (``make bench``); the sections and
outputs are described in :mod:`triadapt.bench.cli`.

* ``cli`` — arguments, the run, its outputs;
* ``config`` — method names, sections, model / method / training configs (from conf/);
* ``machine`` — machine description, torch threads, malloc tuning, device sync;
* ``runner`` — one timed variant, interleaved rounds, paired ratios, per-step counts;
* ``sections`` — the ``main``, ``overhead`` and ``growth`` sections;
* ``memory`` — peak memory in child processes;
* ``scaling`` — step time versus rank, sequence length, model size; its plot;
* ``eval_throughput`` — evaluation throughput on MRPC dev;
* ``report`` — targets, Markdown tables, CSV, summary.
"""
