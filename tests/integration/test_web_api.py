"""The REST API on a real `sagaline web` process, with a real worker and PostgreSQL."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.harness import REPO_ROOT
from tests.integration.web_stack import (
    READ_TOKEN,
    SAGALINE,
    TERMINAL,
    TOKEN,
    WebStack,
    free_port,
    start_server,
    stop_server,
    web_stack,
)

pytestmark = pytest.mark.timeout(300)
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def stack(
    pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WebStack]:
    yield from web_stack(pg_url, redis_url, tmp_path_factory.mktemp("web-home"))


def test_no_token_is_401_a_read_token_may_read_but_not_act(stack: WebStack) -> None:
    with (
        stack.client(None) as anon,
        stack.client(READ_TOKEN) as reader,
        stack.client("not-a-token-at-all-xx") as wrong,
    ):
        r = anon.get("/api/v1/sagas")
        assert r.status_code == 401 and r.headers["content-type"] == PROBLEM
        assert r.json()["status"] == 401 and "Bearer" in r.headers["www-authenticate"]
        assert wrong.get("/api/v1/sagas").status_code == 401
        assert reader.get("/api/v1/sagas").status_code == 200
        r = reader.post("/api/v1/sagas/robot_exploration", json={"area": "x"})
        assert r.status_code == 403 and r.headers["content-type"] == PROBLEM
        assert "may only read" in r.json()["detail"]
        assert reader.post("/api/v1/sagas/cancel", json={"dry_run": True}).status_code == 403


def test_start_answers_201_then_200_for_the_same_key_and_409_for_other_input(
    stack: WebStack,
) -> None:
    with stack.client() as c:
        body = {"area": "idem", "robot_count": 1}
        first = c.post(
            "/api/v1/sagas/robot_exploration", json=body, headers={"Idempotency-Key": "mission-1"}
        )
        assert first.status_code == 201, first.text
        again = c.post(
            "/api/v1/sagas/robot_exploration", json=body, headers={"Idempotency-Key": "mission-1"}
        )
        assert again.status_code == 200
        assert again.json()["saga_id"] == first.json()["saga_id"]
        assert again.headers["location"].endswith(f"/sagas/{first.json()['saga_id']}")
        other = c.post(
            "/api/v1/sagas/robot_exploration",
            json={**body, "area": "else"},
            headers={"Idempotency-Key": "mission-1"},
        )
        assert other.status_code == 409 and other.headers["content-type"] == PROBLEM
        assert "other input" in other.json()["detail"]
        unknown = c.post("/api/v1/sagas/no_such_saga", json={})
        assert unknown.status_code == 404 and "robot_exploration" in unknown.json()["detail"]
        bad = c.post("/api/v1/sagas/robot_exploration", json={"saga_id": "reserved"})
        assert bad.status_code == 422 and bad.headers["content-type"] == PROBLEM
        listed = c.get("/api/v1/sagas", params={"idempotency_key": "mission-1"}).json()
        assert [s["saga_id"] for s in listed["sagas"]] == [first.json()["saga_id"]]
    stack.wait_status(first.json()["saga_id"], TERMINAL)


def test_the_api_and_the_cli_give_the_same_json_for_the_same_saga(stack: WebStack) -> None:
    saga_id = stack.start(fail_at="explore_area", area="same-json")
    stack.wait_status(saga_id, {"COMPENSATED"})
    api_doc = stack.saga(saga_id)
    shown = stack.sagaline("show", saga_id, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == api_doc
    assert api_doc["saga"]["failed_step"] == "explore_area"
    assert "Traceback" in api_doc["saga"]["error"] or "StepFailure" in api_doc["saga"]["error"]

    with stack.client() as c:
        page = c.get("/api/v1/sagas", params={"failed_step": "explore_area", "limit": 500})
    [api_line] = [s for s in page.json()["sagas"] if s["saga_id"] == saga_id]
    listed = stack.sagaline("ls", "--json", "--limit", "10000")
    assert listed.returncode == 0, listed.stderr
    [cli_line] = [
        json.loads(line)
        for line in listed.stdout.splitlines()
        if json.loads(line)["saga_id"] == saga_id
    ]
    assert cli_line == api_line


def test_cancel_compensates_records_the_actor_and_a_second_cancel_is_409(stack: WebStack) -> None:
    saga_id = stack.start(slow={"explore_area": 8}, area="cancel-me")
    stack.wait_status(saga_id, {"RUNNING"})
    with stack.client() as c:
        r = c.post(f"/api/v1/sagas/{saga_id}/cancel", json={"reason": "wrong area"})
        assert r.status_code == 200, r.text
        assert r.json()["status"] in ("COMPENSATING", "COMPENSATED")
        again = c.post(f"/api/v1/sagas/{saga_id}/cancel")
        assert again.status_code == 409 and again.headers["content-type"] == PROBLEM
        assert c.post("/api/v1/sagas/no-such-id/cancel").status_code == 404
        resumed = c.post(f"/api/v1/sagas/{saga_id}/resume")
        assert resumed.status_code == 409
    stack.wait_status(saga_id, {"COMPENSATED"})
    doc = stack.saga(saga_id)
    audits = [e["detail"] for e in doc["history"] if e["kind"] == "operator_action"]
    assert {"action": "cancel", "actor": "operator", "reason": "wrong area"} in audits
    assert {"action": "start", "actor": "operator"} in audits
    assert doc["saga"]["error"] == "wrong area"


def test_the_cli_records_itself_as_the_actor(stack: WebStack) -> None:
    saga_id = stack.start(slow={"plan_route": 8}, area="cli-cancel")
    stack.wait_status(saga_id, {"RUNNING"})
    done = stack.sagaline("cancel", saga_id, "-A", "examples.robots.app")
    assert done.returncode == 0, done.stderr
    audits = [e["detail"] for e in stack.saga(saga_id)["history"] if e["kind"] == "operator_action"]
    assert {"action": "cancel", "actor": "cli", "reason": "cancelled by operator"} in audits
    stack.wait_status(saga_id, {"COMPENSATED"})


def test_bulk_cancel_counts_first_then_cancels_every_match(stack: WebStack) -> None:
    ids = {stack.start(slow={"plan_route": 8}, area="bulk") for _ in range(3)}
    for saga_id in ids:
        stack.wait_status(saga_id, {"RUNNING"})
    flt = {"status": ["RUNNING"], "name": "robot_exploration"}
    with stack.client() as c:
        dry = c.post("/api/v1/sagas/cancel", json={**flt, "dry_run": True}).json()
        assert dry["dry_run"] and ids <= set(dry["saga_ids"]) and dry["cancelled"] == 0
        assert stack.saga(next(iter(ids)))["saga"]["status"] == "RUNNING"
        done = c.post("/api/v1/sagas/cancel", json=flt).json()
        assert ids <= set(done["saga_ids"]) and done["cancelled"] >= 3
    for saga_id in ids:
        stack.wait_status(saga_id, {"COMPENSATED"})


def test_keyset_pages_cover_every_saga_once_while_new_ones_start(stack: WebStack) -> None:
    before = {stack.start(area="page") for _ in range(4)}
    seen: list[str] = []
    token = None
    with stack.client() as c:
        for n in range(100):
            params: dict[str, Any] = {"limit": 2}
            if token:
                params["page_token"] = token
            page = c.get("/api/v1/sagas", params=params).json()
            seen += [s["saga_id"] for s in page["sagas"]]
            if n == 0:
                stack.start(area="page-late")  # newer: never on a later page
            token = page["next_page_token"]
            if token is None:
                break
        assert before <= set(seen) and len(seen) == len(set(seen))
        bad = c.get("/api/v1/sagas", params={"page_token": "!!"})
        assert bad.status_code == 422 and bad.headers["content-type"] == PROBLEM
        assert c.get("/api/v1/sagas", params={"limit": 501}).status_code == 422
        assert c.get("/api/v1/sagas", params={"status": "NOPE"}).status_code == 422


def test_the_event_stream_sends_every_event_once_in_order_then_ends(stack: WebStack) -> None:
    saga_id = stack.start(slow={"plan_route": 1}, area="stream")
    events: list[dict[str, Any]] = []
    with (
        stack.client() as c,
        c.stream("GET", f"/api/v1/sagas/{saga_id}/events/stream", timeout=60) as r,
    ):
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind == "saga_event":
                events.append(json.loads(line[6:]))
            elif line.startswith("data: ") and kind == "end":
                break
    stored = stack.saga(saga_id)["history"]
    assert [e["seq"] for e in events] == [e["seq"] for e in stored]
    assert events[-1]["kind"] == "saga_completed"
    with stack.client() as c:
        later = c.get(
            f"/api/v1/sagas/{saga_id}/events", params={"after_seq": events[2]["seq"]}
        ).json()
    assert [e["seq"] for e in later["events"]] == [e["seq"] for e in stored[3:]]


def test_the_openapi_document_is_3_1_and_health_answers(stack: WebStack) -> None:
    doc = httpx.get(f"{stack.base}/api/v1/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert {"/sagas", "/sagas/{saga_id}", "/sagas/{name}", "/sagas/cancel"} <= set(doc["paths"])
    # Probes need no token: they tell nothing about any saga.
    assert httpx.get(f"{stack.base}/api/v1/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{stack.base}/api/v1/readyz").json() == {"status": "ready"}


def test_metrics_count_the_sagas_this_server_started_and_read_progress_from_the_store(
    stack: WebStack,
) -> None:
    def sample(text: str, name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            metric, _, value = line.rpartition(" ")
            if (
                metric.partition("{")[0] == name
                and ",".join(sorted(metric.partition("{")[2].rstrip("}").split(","))) == want
            ):
                return float(value)
        return 0.0

    with stack.client(None) as anon, stack.client(READ_TOKEN) as reader:
        assert anon.get("/api/v1/metrics").status_code == 401
        before = reader.get("/api/v1/metrics")
        assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
        started = sample(before.text, "sagaline_sagas_started_total", saga="robot_exploration")
        saga_id = stack.start(slow={"plan_route": 3}, area="metrics")
        during = reader.get("/api/v1/metrics").text
        assert (
            sample(during, "sagaline_sagas_started_total", saga="robot_exploration") == started + 1
        )
        assert 'sagaline_sagas_in_progress{saga="robot_exploration",status="running"}' in during
        assert sample(during, "sagaline_store_up") == 1.0
    stack.wait_status(saga_id, TERMINAL)


def test_a_script_in_the_input_is_shown_as_text_and_forms_need_the_csrf_token(
    stack: WebStack,
) -> None:
    saga_id = stack.start(area="<script>alert('x')</script>", slow={"plan_route": 5})
    with httpx.Client(base_url=stack.base, timeout=30) as browser:
        assert browser.get(f"/sagas/{saga_id}").status_code == 303  # to the login page
        login = browser.post("/login", data={"token": "wrong-token-xxxxxxxxxx"})
        assert login.status_code == 401
        login = browser.post(
            "/login", data={"token": stack.env["SAGALINE_WEB_TOKEN"], "next": f"/sagas/{saga_id}"}
        )
        assert login.status_code == 303
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        html = browser.get(f"/sagas/{saga_id}").text
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
        assert "<script>alert" not in html
        assert (
            "script-src 'self'"
            in browser.get(f"/sagas/{saga_id}").headers["content-security-policy"]
        )
        refused = browser.post(f"/sagas/{saga_id}/cancel", data={"csrf": "forged"})
        assert refused.status_code == 403
        assert stack.saga(saga_id)["saga"]["status"] == "RUNNING"
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
        assert csrf is not None
        done = browser.post(f"/sagas/{saga_id}/cancel", data={"csrf": csrf.group(1)})
        assert done.status_code == 303
    stack.wait_status(saga_id, {"COMPENSATED"})


def test_the_server_refuses_a_public_address_without_a_token(stack: WebStack) -> None:
    env = {k: v for k, v in stack.env.items() if not k.startswith("SAGALINE_WEB")}
    proc = subprocess.run(
        [SAGALINE, "web", "--host", "0.0.0.0", "--port", "1"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "without a token" in proc.stderr


def test_resume_after_the_cause_is_fixed_compensates_the_saga(
    stack: WebStack, tmp_path: Path
) -> None:
    fixed = tmp_path / "ledger-unlocked"
    saga_id = stack.start_saga("web_fragile", {"fail": "charge", "fixed": str(fixed)})
    stack.wait_status(saga_id, {"FAILED"})
    assert stack.saga(saga_id)["compensation_failures"].keys() == {"reserve"}
    fixed.touch()  # the operator fixes the cause
    with stack.client() as c:
        r = c.post(f"/api/v1/sagas/{saga_id}/resume")
    assert r.status_code == 200, r.text
    assert r.json()["status"] in ("COMPENSATING", "COMPENSATED")
    stack.wait_status(saga_id, {"COMPENSATED"})
    doc = stack.saga(saga_id)
    assert doc["compensation_failures"] == {}
    assert {"action": "resume", "actor": "operator"} in [
        {k: e["detail"].get(k) for k in ("action", "actor")}
        for e in doc["history"]
        if e["kind"] == "operator_action"
    ]


def test_events_read_in_pages_forwards_or_backwards_cover_the_history_once(
    stack: WebStack,
) -> None:
    saga_id = stack.start(area="backwards")
    stack.wait_status(saga_id, TERMINAL)
    stored = [e["seq"] for e in stack.saga(saga_id)["history"]]
    pages: list[list[int]] = []
    before: int | None = 2**62
    with stack.client() as c:
        after = 0
        while len(pages) < 50:
            r = c.get(f"/api/v1/sagas/{saga_id}/events", params={"after_seq": after, "limit": 4})
            assert r.status_code == 200, r.text
            page = r.json()
            if not page["events"]:
                assert page["next_after_seq"] == after
                break
            pages.append([e["seq"] for e in page["events"]])
            after = page["next_after_seq"]
        assert all(len(p) == 4 for p in pages[:-1]) and len(pages) == -(-len(stored) // 4)
        assert [seq for page in pages for seq in page] == stored
        pages.clear()
        while before is not None and len(pages) < 50:
            r = c.get(f"/api/v1/sagas/{saga_id}/events", params={"before_seq": before, "limit": 4})
            assert r.status_code == 200, r.text
            pages.append([e["seq"] for e in r.json()["events"]])
            before = r.json()["next_before_seq"]
        assert c.get(f"/api/v1/sagas/{saga_id}/events?before_seq=0").status_code == 422
    assert pages[0] == stored[-4:]
    assert [seq for page in reversed(pages) for seq in page] == stored


def test_the_list_stream_sends_the_page_then_each_saga_that_changes(stack: WebStack) -> None:
    seen: dict[str, set[str]] = {}
    started: str | None = None
    with (
        stack.client() as c,
        c.stream("GET", "/api/v1/sagas/stream", params={"limit": 20}, timeout=60) as r,
    ):
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        batches = 0
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            batches += 1
            for saga in json.loads(line[6:])["sagas"]:
                seen.setdefault(saga["saga_id"], set()).add(saga["status"])
            if started is None:  # the first batch is the page as it was
                started = stack.start(area="listed", slow={"plan_route": 1})
            elif seen.get(started, set()) >= {"RUNNING", "COMPLETED"} or batches > 40:
                break
    assert started is not None and seen[started] >= {"RUNNING", "COMPLETED"}
    with stack.client(None) as anon:
        assert anon.get("/api/v1/sagas/stream").status_code == 401


def test_the_graph_is_drawn_from_the_store_without_the_app(stack: WebStack) -> None:
    saga_id = stack.start_saga("web_graph", {})
    old_id = stack.start_saga("web_graph", {})
    stack.wait_status(saga_id, {"COMPLETED"})
    stack.wait_status(old_id, {"COMPLETED"})
    dsn = stack.store_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(dsn, autocommit=True) as conn:  # a saga from before depends_on
        conn.execute("UPDATE sagaline_steps SET depends_on = NULL WHERE saga_id = %s", (old_id,))
    port = free_port()
    server = start_server(stack.env, port, app=None)  # read only: no saga definitions
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as browser:
            browser.post("/login", data={"token": TOKEN})
            html = browser.get(f"/sagas/{saga_id}").text
            old = browser.get(f"/sagas/{old_id}").text
    finally:
        stop_server(server)
    edges = set(re.findall(r'<line class="edge" data-from="(\w+)" data-to="(\w+)"', html))
    assert edges == {
        ("prepare", "left"),
        ("prepare", "right"),
        ("left", "finish"),
        ("right", "finish"),
    }
    assert "in step order" not in html
    assert set(re.findall(r'<line class="edge" data-from="(\w+)" data-to="(\w+)"', old)) == {
        ("prepare", "left"),
        ("left", "right"),
        ("right", "finish"),
    }
    assert "in step order" in old
