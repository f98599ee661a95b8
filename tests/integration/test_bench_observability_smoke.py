"""`python -m bench --quick --only OBS` prints L1 and T1 with metrics and tracing on and off,
their CPU time per saga, and their overhead as numbers.

Benchmarks are not tests: nothing here looks at how fast anything was, nor at whether the
overhead met its target.
"""

from __future__ import annotations

import subprocess
import sys

from tests.harness import REPO_ROOT
from tests.integration.test_bench_smoke import figure_lines

FIGURES = [
    "l1_on_median_ms",
    "l1_off_median_ms",
    "t1_on_per_s",
    "t1_off_per_s",
    "l1_overhead",
    "t1_overhead",
]


def test_quick_observability_benchmark_prints_on_off_figures_and_their_overhead() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "OBS"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    line = figure_lines(proc.stdout)["OBS"]
    assert line["store"] == "sqlite"
    for key in FIGURES:
        value = line[key]
        assert isinstance(value, (int, float)) and value > 0, f"OBS.{key} = {value!r}"
    assert isinstance(line["within_target"], bool)
    # CPU per saga of each side (worker processes and caller), and its ratio.
    for key in ("l1_on_cpu_ms", "l1_off_cpu_ms", "t1_on_cpu_ms", "t1_off_cpu_ms"):
        cpu = line[key]
        assert cpu["total_ms"] > 0 and cpu["worker_ms"] > 0, f"OBS.{key} = {cpu!r}"
        assert cpu["total_ms"] >= cpu["worker_ms"] >= cpu["worker_system_ms"] >= 0
    assert line["l1_cpu_overhead"] > 0 and line["t1_cpu_overhead"] > 0
    assert isinstance(line["cpu_within_target"], bool)
    # The traced side was really exported and scraped, so the cost measured is real.
    assert line["metrics_scrapes"] > 0 and line["metrics_scrape_failures"] == 0
    assert line["otlp_requests"] > 0 and line["otlp_bytes"] > 0
    assert "(holds)" in proc.stdout or "(exceeds)" in proc.stdout  # the summary table's row
