"""`python -m bench --quick` keeps working: it exits 0 and prints every figure with its numbers.

Benchmarks are not tests: nothing here looks at how fast anything was.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from tests.harness import REPO_ROOT

EXPECTED: dict[str, list[str]] = {
    "L1": [
        "sagaline_median_ms",
        "sagaline_p95_ms",
        "baseline_median_ms",
        "baseline_p95_ms",
        "ratio_median",
        "ratio_p95",
    ],
    "L2": [
        "sagaline_median_ms",
        "sagaline_p95_ms",
        "baseline_median_ms",
        "baseline_p95_ms",
        "ratio_median",
    ],
    "T1": [
        "sagas",
        "sagaline_seconds",
        "sagaline_per_s",
        "baseline_seconds",
        "baseline_per_s",
        "ratio_throughput",
    ],
    "S1": ["sagaline_growth", "baseline_growth", "ratio_at_max"],
    "H1": [
        "history",
        "l1_sagaline_median_ms",
        "l1_vs_empty",
        "t1_sagaline_per_s",
        "t1_vs_empty",
        "list_compensated_50_median_ms",
    ],
    "R1": [
        "sql_statements_per_step",
        "transactions_per_step",
        "sagaline_messages_per_step",
        "baseline_messages_per_step",
        "caller_sql_per_run",
    ],
    "MEM": ["sagaline_total_kb", "baseline_total_kb", "ratio_total"],
}
# G1's latencies may be 0 or below (get() can return before the committing call
# has): only there, and numbers.
G1_NUMBERS = ["median_ms", "p90_ms", "p99_ms", "max_ms", "caller_cpu_per_get_ms"]


def figure_lines(stdout: str) -> dict[str, dict[str, Any]]:
    found = {}
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        data = json.loads(line)
        found[data["figure"]] = data
    return found


def test_quick_benchmark_prints_every_figure_with_positive_numbers() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    figures = figure_lines(proc.stdout)
    assert set(EXPECTED) <= set(figures), f"missing figures: {set(EXPECTED) - set(figures)}"
    for name, keys in EXPECTED.items():
        line = figures[name]
        assert line["store"] == "sqlite"
        for key in keys:
            value = line[key]
            assert isinstance(value, (int, float)) and value > 0, f"{name}.{key} = {value!r}"
    g1 = figures["G1"]
    assert g1["store"] == "sqlite" and g1["waited"] > 0
    for key in G1_NUMBERS:
        assert isinstance(g1[key], (int, float)), f"G1.{key} = {g1[key]!r}"
    # Woken by its peek at the file, not by polling: two reads, before and after.
    assert 1 <= g1["reads_per_get_max"] <= 2, g1
    lengths = figures["S1"]["lengths"]
    assert set(lengths) == {"4", "8"}
    for per_length in lengths.values():
        assert per_length["sagaline_ms_per_step"] > 0 and per_length["baseline_ms_per_step"] > 0
