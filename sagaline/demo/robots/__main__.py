"""Start exploration sagas: `python -m sagaline.demo.robots [--fail-at STEP] ...`.

A worker must be running (`sagaline worker -A sagaline.demo.robots.app`) with the
same CELERY_BROKER_URL / SAGALINE_STORE_URL (or the same SAGALINE_HOME).
Prints one line per saga: its id and, unless --no-wait, its final status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TypeVar

from sagaline import SagaError, SagaOutcomeError

from .sagas import STEPS, exploration, exploration_input

T = TypeVar("T")


def _pairs(values: list[str], kind: Callable[[str], T]) -> dict[str, T]:
    out: dict[str, T] = {}
    for item in values:
        step, _, value = item.partition("=")
        out[step.strip()] = kind(value)
    return out


def main(argv: list[str] | None = None, prog: str = "python -m sagaline.demo.robots") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--area", default="sector")
    parser.add_argument("--robots", type=int, default=2)
    parser.add_argument("--fail-at", choices=STEPS)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="run i uses seed + i")
    parser.add_argument("--slow", action="append", default=[], metavar="STEP=SECONDS")
    parser.add_argument(
        "--flaky",
        action="append",
        default=[],
        metavar="STEP=N",
        help="the first N attempts of STEP fail with a transient error",
    )
    parser.add_argument("--no-wait", action="store_true")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    try:
        handles = [
            exploration.run(
                **exploration_input(
                    f"{args.area}-{i + 1}" if args.runs > 1 else args.area,
                    args.robots,
                    fail_at=args.fail_at,
                    fail_rate=args.fail_rate,
                    seed=args.seed + i,
                    slow=_pairs(args.slow, float),
                    flaky=_pairs(args.flaky, int),
                )
            )
            for i in range(args.runs)
        ]
    except (ValueError, SagaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    code = 0
    for handle in handles:
        if args.no_wait:
            print(handle.saga_id, flush=True)
            continue
        try:
            handle.get(timeout=args.timeout)
        except SagaOutcomeError:
            pass
        except SagaError as exc:
            print(f"error: {exc}", file=sys.stderr)
            code = 1
        print(handle.saga_id, handle.status.value, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
