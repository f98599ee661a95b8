"""`python -m bench.plugin`: the pytest plugin's figures, one JSON line each.

- import: milliseconds to import `sagaline.pytest_plugin` after pytest (best of 5
  fresh interpreters; target <= 100 ms);
- long_saga: wall seconds for saga_env to run a 10-step saga whose every step
  fails once and is retried an hour later, under a 1-day deadline (best of 3;
  target < 0.5 s);
- explore_robots: scenarios and wall seconds of `explore_failures` on the robot
  exploration saga (target >= 3 x 4 steps in < 10 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any


def import_ms() -> float:
    code = (
        "import time, pytest\nt = time.perf_counter()\nimport sagaline.pytest_plugin\n"
        "print((time.perf_counter() - t) * 1000)\n"
    )
    runs = [
        float(
            subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
            ).stdout
        )
        for _ in range(5)
    ]
    return round(min(runs), 1)


def long_saga_seconds() -> dict[str, Any]:
    from sagaline.testkit import SagaEnv, assert_completed
    from tests.plugin import shop

    best = float("inf")
    elapsed = 0.0
    for _ in range(3):
        shop.reset_world()
        with SagaEnv([shop.app]) as env:
            started = time.perf_counter()
            assert_completed(env.run(shop.long_saga))
            best = min(best, time.perf_counter() - started)
            elapsed = env.clock.elapsed
    return {"wall_s": round(best, 3), "virtual_h": round(elapsed / 3600, 2)}


def explore_robots() -> dict[str, Any]:
    from sagaline.demo.robots import models
    from sagaline.demo.robots.app import app  # noqa: F401
    from sagaline.demo.robots.sagas import exploration, exploration_input
    from sagaline.testkit import explore_failures

    def world() -> Any:
        with models.engine().connect() as conn:
            return [
                conn.execute(t.select()).all() for t in (models.robots, models.routes, models.maps)
            ]

    def reset() -> None:
        with models.engine().begin() as conn:
            for t in (models.routes, models.missions, models.maps):
                conn.execute(t.delete())
            conn.execute(models.robots.update().values(status="idle", assigned_saga=None))

    report = explore_failures(exploration, exploration_input("north"), world=world, reset=reset)
    return {
        "scenarios": len(report.scenarios),
        "steps": len(exploration.steps),
        "wall_s": round(report.seconds, 2),
        "violations": len(report.violations),
    }


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="sagaline-bench-plugin-") as tmp:
        os.environ.setdefault("SAGALINE_HOME", tmp)
        os.environ["EXAMPLE_DB_URL"] = f"sqlite:///{tmp}/fleet.db"
        for name, figure in (
            ("import_ms", import_ms),
            ("long_saga", long_saga_seconds),
            ("explore_robots", explore_robots),
        ):
            print(json.dumps({"figure": name, "value": figure()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
