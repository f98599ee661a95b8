"""Benchmarks: sagaline against plain Celery (chains on a Redis result backend), in one run.

`python -m bench` (or `make bench`) starts its own Redis and Celery workers, runs
every figure for sagaline and for the baseline, alternating, and prints one JSON
line per figure and a table of ratios. Benchmarks measure; they assert nothing.
"""
