"""The web app in-process (no server): mounting under a prefix, escaping, tokens, and a
core that never imports the web extra."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sagaline.records import Event, SagaFilter, SagaRecord, SagaState, StepRecord
from sagaline.states import SagaStatus, StepStatus
from sagaline.stores.memory import MemoryStore

pytest.importorskip("fastapi")
from fastapi import FastAPI
from fastapi.testclient import TestClient

from sagaline.web import create_app
from sagaline.web.security import Access

T0 = 1_700_000_000.0


def saved_saga(store: MemoryStore, name: str = "shop", **input: object) -> str:
    sid = f"saga-{len(store.list_sagas(SagaFilter(limit=1000)))}"
    saga = SagaRecord(
        saga_id=sid,
        name=name,
        status=SagaStatus.RUNNING,
        input=dict(input),
        fingerprint="f" * 16,
        created_at=T0,
        updated_at=T0,
    )
    steps = {
        "a": StepRecord(sid, "a", 0, status=StepStatus.DISPATCHED, attempt=1),
        "b": StepRecord(sid, "b", 1),
    }
    store.create_saga(SagaState(saga, steps), [Event(sid, "saga_started", T0)])
    return sid


def test_the_core_and_the_cli_never_import_the_web_framework() -> None:
    code = (
        "import sys, sagaline, sagaline.cli, sagaline.ops\n"
        "bad = [m for m in ('fastapi', 'starlette', 'uvicorn', 'jinja2') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_mounted_under_a_prefix_every_link_and_asset_carries_the_prefix() -> None:
    store = MemoryStore()
    sid = saved_saga(store, area="north")
    host = FastAPI()
    host.mount("/ops/sagas", create_app(store=store, token="", read_token=""))
    client = TestClient(host)
    listing = client.get("/ops/sagas/")
    assert listing.status_code == 200
    assert f'href="/ops/sagas/sagas/{sid}"' in listing.text
    assert 'href="/ops/sagas/static/style.css"' in listing.text
    assert client.get("/ops/sagas/static/app.js").status_code == 200
    page = client.get(f"/ops/sagas/sagas/{sid}")
    assert page.status_code == 200 and "/ops/sagas/api/v1/sagas/" in page.text
    doc = client.get(f"/ops/sagas/api/v1/sagas/{sid}").json()
    assert doc["saga"]["input"] == {"area": "north"}
    assert client.get("/ops/sagas/api/v1/openapi.json").json()["openapi"].startswith("3.1")


def test_input_is_escaped_everywhere_on_the_page() -> None:
    store = MemoryStore()
    sid = saved_saga(store, note="<script>alert(1)</script>", **{"<img src=x>": "k"})
    client = TestClient(create_app(store=store, token="", read_token=""))
    html = client.get(f"/sagas/{sid}").text
    assert "<script>alert(1)" not in html and "<img src=x>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_a_read_only_app_offers_no_action_and_refuses_one() -> None:
    store = MemoryStore()
    sid = saved_saga(store)
    client = TestClient(create_app(store=store, token="", read_token=""))
    assert "cancel-button" not in client.get(f"/sagas/{sid}").text
    r = client.post(f"/api/v1/sagas/{sid}/cancel")
    assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"


def test_tokens_are_named_scoped_and_must_be_long_enough() -> None:
    access = Access(
        "alice:secret-token-number-one,secret-token-number-two", "auditor:read-token-000000000"
    )
    alice = access.by_token("secret-token-number-one")
    assert alice is not None and (alice.name, alice.scope) == ("alice", "operate")
    other = access.by_token("secret-token-number-two")
    assert other is not None and other.name == "operator"
    auditor = access.by_token("read-token-000000000")
    assert auditor is not None and not auditor.may_operate
    assert access.by_token("nope") is None
    assert access.by_session(access.session_value(alice)) == alice
    assert access.by_session("alice:operate:" + "0" * 64) is None
    assert access.csrf_ok(alice, access.csrf_token(alice))
    assert not access.csrf_ok(auditor, access.csrf_token(alice))
    with pytest.raises(Exception, match="too short"):
        Access("short")


def test_a_page_token_holds_the_exact_time_of_the_last_saga() -> None:
    from sagaline.web.api import decode_token, encode_token

    for created_at in (1764523000.1234567, 1764523000.0, 0.1 + 0.2, 1e9 + 1e-6):
        assert decode_token(encode_token(created_at, "a-1")) == (created_at, "a-1")


def test_the_api_schema_of_a_saga_has_every_field_of_the_record() -> None:
    # A column added to SagaRecord must reach the API's schema too, or `show --json` and
    # GET /sagas/{id} stop giving the same document.
    import dataclasses

    from sagaline.records import SagaRecord
    from sagaline.web import schemas

    assert set(schemas.Saga.model_fields) == {f.name for f in dataclasses.fields(SagaRecord)}


def test_every_fixed_path_beside_a_saga_id_is_an_id_no_saga_may_have() -> None:
    # GET /sagas/{saga_id} comes after these routes and never sees their ids.
    from sagaline.names import RESERVED_SAGA_IDS
    from sagaline.web.api import api_app

    fixed = set()
    for route in api_app([]).routes:
        path, methods = getattr(route, "path", ""), getattr(route, "methods", None) or set()
        parts = path.split("/")
        if "GET" in methods and len(parts) > 2 and parts[1] == "sagas" and parts[2][:1] != "{":
            fixed.add(parts[2])
    assert fixed == RESERVED_SAGA_IDS == {"counts", "stream"}
