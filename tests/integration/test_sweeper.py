"""The sweeper repairs lost messages and dead workers, and is safe to run in many processes."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator

import pytest
from celery import Celery

import sagaline
from sagaline.runtime import Runtime
from sagaline.states import Phase
from tests.harness import REPO_ROOT, drop_database, shared_postgres_url
from tests.integration import sagas_app

SWEEPER = """
import sys, time
from celery import Celery
import sagaline
from tests.integration import sagas_app  # the saga definitions
rt = sagaline.init_app(Celery("sweeper", broker="memory://"), store=sys.argv[1],
                       sweeper=False, redispatch_after=1.0, lease=60)
started = time.time()
end = time.monotonic() + float(sys.argv[2])
passes = acted = 0
while time.monotonic() < end:
    acted += sagaline.sweep(rt)
    passes += 1
    time.sleep(0.02)
print(passes, acted, started, time.time())
"""


@pytest.fixture
def store_url() -> Iterator[str]:
    url = shared_postgres_url(f"sagaline_sweep_{uuid.uuid4().hex[:8]}")
    yield url
    drop_database(url)


def test_three_sweepers_at_once_never_double_transition_anything(
    store_url: str, tmp_path: pytest.TempPathFactory
) -> None:
    rt = sagaline.init_app(
        Celery("creator", broker="memory://"), store=store_url, sweeper=False, redispatch_after=0.5
    )
    rt.publish = lambda dispatches: None  # type: ignore[method-assign]  # every message lost
    lost = [rt.start_saga(sagas_app.four_steps, {"value": i}).saga_id for i in range(20)]
    dead = [rt.start_saga(sagas_app.four_steps, {"value": i}).saga_id for i in range(20)]
    now = time.time()
    for saga_id in dead:  # claimed by a worker that then died: its lease runs out
        assert rt.store.claim_step(saga_id, "s1", Phase.FORWARD, 1, lease_until=now + 0.5, now=now)
    time.sleep(0.6)

    env = {"SAGALINE_HOME": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SWEEPER, store_url, "6"],
            cwd=REPO_ROOT,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
    runs = [o[0].split() for o in outputs]
    assert all(int(r[0]) >= 1 for r in runs), runs
    # They really ran side by side: every one started before any one ended.
    assert max(float(r[2]) for r in runs) < min(float(r[3]) for r in runs), runs

    for saga_id in lost:
        history = sagaline.get_saga(saga_id, runtime=rt).history
        redispatched = [e.ts for e in history if e.kind == "step_redispatched"]
        # Due every 1 s for ~6 s: some redispatches, never two in the same due period.
        assert 1 <= len(redispatched) <= 7, redispatched
        gaps = [b - a for a, b in itertools.pairwise(redispatched)]
        assert all(g >= 0.9 for g in gaps), gaps
        assert {e.attempt for e in history if e.kind == "step_redispatched"} == {1}

    for saga_id in dead:
        history = sagaline.get_saga(saga_id, runtime=rt).history
        expiries = Counter(
            (e.step, e.attempt)
            for e in history
            if e.kind == "step_attempt_failed" and e.detail.get("reason") == "lease_expired"
        )
        assert expiries == {("s1", 1): 1}
        view = sagaline.get_saga(saga_id, runtime=rt)
        assert view.step("s1").attempt == 2 and view.step("s1").status.value == "DISPATCHED"

    # Every event sequence is strictly increasing per saga and no transition repeats.
    for saga_id in lost + dead:
        history = sagaline.get_saga(saga_id, runtime=rt).history
        seqs = [e.seq for e in history]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        per_step: dict[str, list[str]] = defaultdict(list)
        for e in history:
            if e.step:
                per_step[e.step].append(f"{e.kind}:{e.attempt}")
        for events in per_step.values():
            once = [k for k in events if not k.startswith("step_redispatched")]
            assert len(once) == len(set(once)), events


def test_a_lost_message_is_published_again_and_the_saga_completes(
    store_url: str,
    pg_url: str,
    redis_url: str,
    worker_factory: object,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from tests.integration.conftest import make_stack

    stacks = make_stack(
        "redis+postgres", pg_url, redis_url, tmp_path_factory, {"SAGALINE_REDISPATCH_AFTER": "1"}
    )
    stack = next(stacks)
    try:
        rt: Runtime = stack.runtime
        real_publish = rt.publish
        rt.publish = lambda dispatches: None  # type: ignore[method-assign]
        handle = rt.start_saga(sagas_app.four_steps, {"value": 7})  # root message lost
        rt.publish = real_publish  # type: ignore[method-assign]
        assert handle.get(timeout=60)["s4_done"] is True
        kinds = [e.kind for e in sagaline.get_saga(handle.saga_id, runtime=rt).history]
        assert "step_redispatched" in kinds
    finally:
        next(stacks, None)
