"""Where a sagaline worker spends a step: py-spy records the pool processes under a T1 load.

`python -m bench --profile DIR` runs this after the figures of each store. py-spy
samples each pool process (wall clock, idle included) while sagas are submitted
in batches for a bounded time; the collapsed stacks are written to DIR and
summarised: the share of the step hot path (sagaline's `execution.execute`) spent
in the claim, the complete transaction, the engine, the publish and the body,
and the functions with the most samples.
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.waits import wait_sagas

FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# Hot-path parts: (label, function, file suffix); inclusive samples under `execute`.
PARTS = [
    ("claim (store.claim_step)", "claim_step", "sagaline/stores/sql.py"),
    ("claim (Redis store)", "claim_step", "sagaline/stores/redis.py"),
    ("complete (Runtime.transact)", "transact", "sagaline/runtime.py"),
    ("  store.transact", "transact", "sagaline/stores/base.py"),
    ("    engine decision", "step_succeeded", "sagaline/engine.py"),
    ("    write decision", "write_decision", "sagaline/stores/sql_statements.py"),
    ("    read for a decision (PostgreSQL, psycopg)", "snapshot", "sagaline/stores/pg_hot.py"),
    ("    write decision (PostgreSQL, psycopg)", "_write", "sagaline/stores/pg_hot.py"),
    ("    read for a decision (Redis)", "_load_state", "sagaline/stores/redis.py"),
    ("  publish (after commit)", "publish", "sagaline/runtime.py"),
    ("body (the task)", "saga_noop", "bench/app.py"),
    ("heartbeat add/remove", "Heartbeat.add", "sagaline/leases.py"),
    ("SagaState from rows", "step_record", "sagaline/stores/sql_statements.py"),
    ("engine Work copy", "Work.__init__", "sagaline/work.py"),
    ("signals", "send", "celery/utils/dispatch/signal.py"),
    ("definition lookup + payload check", "check_output", "sagaline/payload.py"),
    ("SQLAlchemy compile", "_compile_w_cache", "sqlalchemy/sql/elements.py"),
    ("DB driver execute (statements)", "do_execute", "sqlalchemy/engine/default.py"),
    ("DB commit", "_commit_impl", "sqlalchemy/engine/base.py"),
    ("psycopg wait (network)", "wait_c", "psycopg/waiting.py"),
    ("kombu publish", "publish", "kombu/messaging.py"),
]


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


def profile_workers(b: Any, out: Path, seconds: float) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    pids = b.saga_worker.child_pids()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for pid in pids:
            procs.append(
                subprocess.Popen(
                    [
                        py_spy(),
                        "record",
                        "--pid",
                        str(pid),
                        "--duration",
                        str(int(seconds)),
                        "--rate",
                        "250",
                        "--idle",
                        "--format",
                        "raw",
                        "--output",
                        str(out / f"child-{pid}.txt"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(1.0)  # py-spy attaches
        saga = b.mod.SAGAS["noop4"]
        deadline = time.monotonic() + seconds
        submitted = 0
        for _ in range(100_000):
            if time.monotonic() >= deadline:
                break
            handles = [saga.run() for _ in range(40)]
            submitted += len(handles)
            wait_sagas(handles, timeout=120, what=f"[{b.store}] profile load")
        for p in procs:
            p.wait(timeout=seconds + 60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    summary = summarise(sorted(out.glob("child-*.txt")))
    summary["sagas_submitted"] = submitted
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    b.log(f"[{b.store}] profile: {json.dumps(summary['hot_path_shares'])}")
    for row in summary["top_inclusive_in_execute"][:25]:
        b.log(f"[{b.store}]   {row['share']:6.1%}  {row['function']}")
    return summary


def _frames(stack: str) -> list[tuple[str, str]]:
    frames = []
    for raw in stack.split(";"):
        m = FRAME.match(raw.strip())
        if m:
            frames.append((m["fn"], m["file"]))
        else:
            frames.append((raw.strip(), ""))
    return frames


def summarise(files: list[Path]) -> dict[str, Any]:
    total = 0
    in_execute = 0
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    parts: collections.Counter[str] = collections.Counter()
    for path in files:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = _frames(stack)
            names = [(fn, file) for fn, file in frames]
            if not any(
                _is(fn, "execute") and file.endswith("sagaline/execution.py") for fn, file in names
            ):
                continue
            in_execute += n
            seen: set[str] = set()
            for fn, file in names:
                key = f"{fn} ({_short(file)})"
                if key not in seen:
                    seen.add(key)
                    inclusive[key] += n
            fn, file = names[-1]
            leaf[f"{fn} ({_short(file)})"] += n
            for label, pfn, pfile in PARTS:
                if any(_is(fn, pfn) and file.endswith(pfile) for fn, file in names):
                    parts[label] += n
    denom = max(in_execute, 1)
    return {
        "samples": total,
        "samples_in_execute": in_execute,
        "hot_path_shares": {label: round(parts[label] / denom, 3) for label, _, _ in PARTS},
        "top_inclusive_in_execute": [
            {"function": k, "share": round(v / denom, 4)} for k, v in inclusive.most_common(60)
        ],
        "top_self_in_execute": [
            {"function": k, "share": round(v / denom, 4)} for k, v in leaf.most_common(40)
        ],
    }


def _is(qualname: str, name: str) -> bool:
    """py-spy names methods `Class.method`: match on the last part."""
    return qualname == name or qualname.endswith("." + name)


_REPO = str(Path(__file__).resolve().parent.parent) + "/"


def _short(file: str) -> str:
    for marker in ("site-packages/", _REPO):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


if __name__ == "__main__":
    print(json.dumps(summarise([Path(p) for p in sys.argv[1:]]), indent=2))
