"""`python -m bench.store_cpu` keeps working: one line per store, with the store's CPU time.

Benchmarks are not tests: nothing here looks at how fast anything was, only that
every figure is there, positive, and measured on the store's own durable server.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.harness import REPO_ROOT

KEYS = [
    "seconds",
    "sagas_per_s",
    "store_cpu_s",
    "sagas_per_s_per_store_core",
    "store_cpu_ms_per_saga",
    "worker_cpu_s",
    "worker_cpu_ms_per_saga",
    "chain_worker_cpu_ms_per_chain",  # the plain-chain floor, measured once per run
    "worker_cpu_vs_chain",
]


def test_store_cpu_benchmark_prints_the_sagas_per_store_core_of_each_store() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.store_cpu", "--sagas", "20"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [line["store"] for line in lines] == ["postgres", "redis"]
    for line in lines:
        assert line["figure"] == "CORE" and line["sagas"] == 20 and line["steps"] == 4
        for key in KEYS:
            value = line[key]
            assert isinstance(value, (int, float)) and value > 0, f"{line['store']}.{key}={value!r}"
    assert "synchronous_commit" in lines[0]["store_settings"]
    assert "appendfsync always" in lines[1]["store_settings"]


def test_store_cpu_benchmark_refuses_an_unknown_store() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.store_cpu", "--stores", "postgres,mongodb"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "mongodb" in proc.stderr
