"""Benchmarks: sagaline against plain Celery (chains on a Redis result backend), in one run.

`python -m bench` (or `make bench`) starts its own Redis and Celery workers, runs
every figure for sagaline and for the baseline, alternating, and prints one JSON
line per figure and a table of ratios. `--peers` adds L1 and T1 on DBOS and
celery-saga, each beside the same baseline (bench/peers.py). Benchmarks measure;
they assert nothing.
"""
