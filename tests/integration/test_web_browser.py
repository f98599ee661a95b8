"""The dashboard in headless Chromium (Debian's), driven by Playwright, on real processes."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sagaline.records import Event
from sagaline.states import SagaStatus
from sagaline.stores import store_from_url
from tests.harness import REPO_ROOT, wait_until
from tests.integration.web_stack import TERMINAL, TOKEN, WebStack, web_stack

sync_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.timeout(300)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Screenshots land here (CI keeps the folder as an artifact).
ARTIFACTS = REPO_ROOT / "build" / "test-artifacts"


@pytest.fixture(scope="module")
def stack(
    pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WebStack]:
    yield from web_stack(pg_url, redis_url, tmp_path_factory.mktemp("browser-home"))


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: make test installs it (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: sync_api.Browser, stack: WebStack) -> Iterator[sync_api.Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.goto(f"{stack.base}/")
    pg.fill("input[name=token]", TOKEN)
    pg.click("button[type=submit]")
    pg.wait_for_selector("table.sagas")
    try:
        yield pg
    finally:
        context.close()


def test_a_compensated_saga_shows_the_failing_step_its_error_and_compensations_in_reverse(
    stack: WebStack, page: sync_api.Page
) -> None:
    saga_id = stack.start(fail_at="explore_area", flaky={"plan_route": 1}, area="north")
    stack.wait_status(saga_id, {"COMPENSATED"})
    page.goto(f"{stack.base}/sagas/{saga_id}")
    why = page.locator("#why")
    assert page.inner_text("#saga-status") == "COMPENSATED"
    assert page.inner_text("#why-step") == "explore_area"
    assert "attempt 1 of 3" in why.inner_text()
    error = page.inner_text("#why-error")
    assert "explore_area: failed after applying its change" in error
    assert "Traceback" in error
    undone = page.locator("#compensations li").evaluate_all(
        "items => items.map(li => li.dataset.step)"
    )
    assert undone == ["explore_area", "plan_route", "allocate_robots"]
    assert page.locator("#dag g.node.comp-COMPENSATED").count() == 3
    assert page.locator("#timeline g.bar.lane-compensate").count() == 3
    page.check("#failures-only")
    visible = page.locator("#history tr.ev:visible").count()
    assert 0 < visible < page.locator("#history tr.ev").count()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "compensated-saga-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_a_running_saga_page_follows_its_steps_without_a_reload(
    stack: WebStack, page: sync_api.Page
) -> None:
    saga_id = stack.start(slow={"plan_route": 3}, area="live")
    wait_until(
        lambda: stack.saga(saga_id)["steps"][1]["status"] == "RUNNING",
        timeout=30,
        interval=0.1,
        what="plan_route running",
    )
    page.goto(f"{stack.base}/sagas/{saga_id}")
    assert "plan_route RUNNING" in page.inner_text("#waits")
    page.evaluate("window.__same_page = true")
    row = page.locator("#steps tr[data-step=plan_route]")
    assert "RUNNING" in row.inner_text()
    wait_until(
        lambda: stack.saga(saga_id)["steps"][1]["status"] == "SUCCEEDED",
        timeout=30,
        interval=0.05,
        what="plan_route succeeded",
    )
    done_at = time.monotonic()
    # The bound: the open page shows it within 2 s, without a reload.
    page.wait_for_function(
        "() => document.querySelector('#steps tr[data-step=plan_route]')"
        ".innerText.includes('SUCCEEDED')",
        timeout=2000,
    )
    assert time.monotonic() - done_at < 2.5
    assert page.evaluate("window.__same_page") is True
    stack.wait_status(saga_id, {"COMPLETED"})
    page.wait_for_function(
        "() => document.querySelector('#saga-status').innerText === 'COMPLETED'", timeout=5000
    )
    assert page.evaluate("window.__same_page") is True


def test_cancel_from_the_page_compensates_the_saga(stack: WebStack, page: sync_api.Page) -> None:
    saga_id = stack.start(slow={"explore_area": 8}, area="ui-cancel")
    wait_until(
        lambda: stack.saga(saga_id)["steps"][2]["status"] == "RUNNING",
        timeout=30,
        interval=0.1,
        what="explore_area running",
    )
    page.goto(f"{stack.base}/sagas/{saga_id}")
    dialogs: list[str] = []

    def answer(dialog: sync_api.Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", answer)
    page.click("#cancel-button")
    page.wait_for_selector("#notice")
    assert dialogs and "compensated" in dialogs[0]
    store = store_from_url(stack.store_url)
    try:
        wait_until(
            lambda: (
                (s := store.get_saga(saga_id)) is not None and s.status is SagaStatus.COMPENSATED
            ),
            timeout=60,
            interval=0.2,
            what="saga compensated after the UI cancel",
        )
        steps = {s.name: s for s in store.get_steps(saga_id)}
        assert steps["allocate_robots"].comp_status is not None
        assert steps["allocate_robots"].comp_status.value == "COMPENSATED"
        audits = [e.detail for e in store.history(saga_id) if e.kind == "operator_action"]
        assert any(a["action"] == "cancel" and a["actor"] == "operator" for a in audits)
    finally:
        store.close()
    page.wait_for_function(
        "() => document.querySelector('#saga-status').innerText === 'COMPENSATED'", timeout=10_000
    )
    # The notice of the cancel stays on the page, and still reads true.
    assert page.inner_text("#notice").startswith("Cancelled: its applied steps are compensated")
    assert [li.get_attribute("data-step") for li in page.locator("#compensations li").all()] == [
        "explore_area",
        "plan_route",
        "allocate_robots",
    ]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "cancelled-saga-page.png"))


def test_a_dismissed_confirmation_cancels_nothing(stack: WebStack, page: sync_api.Page) -> None:
    saga_id = stack.start(slow={"plan_route": 4}, area="ui-keep")
    stack.wait_status(saga_id, {"RUNNING"})
    page.goto(f"{stack.base}/sagas/{saga_id}")
    page.on("dialog", lambda dialog: dialog.dismiss())
    page.click("#cancel-button")
    page.wait_for_timeout(500)
    assert stack.saga(saga_id)["saga"]["status"] in ("RUNNING", "COMPLETED")
    stack.wait_status(saga_id, {"COMPLETED"})


def test_the_list_shows_counts_and_filters_by_status(stack: WebStack, page: sync_api.Page) -> None:
    saga_id = stack.start(fail_at="plan_route", area="list")
    stack.wait_status(saga_id, {"COMPENSATED"})
    page.goto(f"{stack.base}/?status=COMPENSATED&failed_step=plan_route")
    assert page.locator(f"a[href$='/sagas/{saga_id}']").count() == 1
    assert "COMPLETED" not in page.inner_text("table.sagas tbody")
    counts = page.inner_text(".counts")
    assert "COMPENSATED" in counts


def test_resume_from_the_page_finishes_a_saga_once_its_cause_is_fixed(
    stack: WebStack, page: sync_api.Page, tmp_path: Path
) -> None:
    fixed = tmp_path / "ledger-unlocked"
    saga_id = stack.start_saga("web_fragile", {"fail": "charge", "fixed": str(fixed)})
    stack.wait_status(saga_id, {"FAILED"})
    page.goto(f"{stack.base}/sagas/{saga_id}")
    assert page.inner_text("#saga-status") == "FAILED"
    assert "Needs attention" in page.inner_text("#why")
    assert "ledger is locked" in page.inner_text("#attention")
    fixed.touch()  # the operator fixes the cause, then resumes
    dialogs: list[str] = []

    def answer(dialog: sync_api.Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", answer)
    page.click("#resume-button")
    page.wait_for_selector("#notice")
    assert dialogs and "Resume saga" in dialogs[0]
    page.evaluate("window.__same_page = true")
    store = store_from_url(stack.store_url)
    try:
        wait_until(
            lambda: (
                (s := store.get_saga(saga_id)) is not None and s.status is SagaStatus.COMPENSATED
            ),
            timeout=60,
            interval=0.2,
            what="saga compensated after the UI resume",
        )
        reserve = {s.name: s for s in store.get_steps(saga_id)}["reserve"]
        assert reserve.comp_status is not None and reserve.comp_status.value == "COMPENSATED"
        audits = [e.detail for e in store.history(saga_id) if e.kind == "operator_action"]
        assert any(a["action"] == "resume" and a["actor"] == "operator" for a in audits)
    finally:
        store.close()
    page.wait_for_function(
        "() => document.querySelector('#saga-status').innerText === 'COMPENSATED'", timeout=5000
    )
    assert page.evaluate("window.__same_page") is True
    assert page.locator("#attention").count() == 0
    assert page.locator("#resume-button").count() == 0


def test_the_list_shows_a_new_saga_and_its_status_changes_without_a_reload(
    stack: WebStack, page: sync_api.Page
) -> None:
    page.goto(f"{stack.base}/?name=robot_exploration")
    page.evaluate("window.__same_page = true")
    page.wait_for_timeout(300)  # the stream is open
    saga_id = stack.start(area="list-live", slow={"plan_route": 2})
    started = time.monotonic()
    row = f"table.sagas a[href$='/sagas/{saga_id}']"
    page.wait_for_selector(row, timeout=2000)
    assert time.monotonic() - started < 2.5
    stack.wait_status(saga_id, {"COMPLETED"})
    done = time.monotonic()
    page.wait_for_function(
        "id => [...document.querySelectorAll('table.sagas tr')].some(tr =>"
        " tr.innerText.includes(id) && tr.innerText.includes('COMPLETED'))",
        arg=saga_id,
        timeout=2000,
    )
    assert time.monotonic() - done < 2.5
    assert page.evaluate("window.__same_page") is True
    assert page.get_attribute("#live-list", "data-live") == "stream"  # not the polling


def test_without_event_source_the_list_polls(stack: WebStack, page: sync_api.Page) -> None:
    page.add_init_script("delete window.EventSource")  # a browser or proxy without SSE
    page.goto(f"{stack.base}/?name=robot_exploration")
    assert page.get_attribute("#live-list", "data-live") == "polling"
    saga_id = stack.start(area="list-polled")
    page.wait_for_selector(f"table.sagas a[href$='/sagas/{saga_id}']", timeout=8000)
    stack.wait_status(saga_id, TERMINAL)


def test_the_newest_events_show_and_earlier_ones_load_on_demand(
    stack: WebStack, page: sync_api.Page
) -> None:
    saga_id = stack.start_saga("web_graph", {})
    stack.wait_status(saga_id, {"COMPLETED"})
    store = store_from_url(stack.store_url)
    try:
        for i in range(240):  # a long history: notes appended after the saga ended
            store.append_event(Event(saga_id, "note", time.time(), detail={"i": i}))
        seqs = [e.seq for e in store.history(saga_id)]
    finally:
        store.close()
    page.goto(f"{stack.base}/sagas/{saga_id}")
    rows = page.locator("#history-rows tr")
    assert rows.count() == 200
    assert rows.first.locator("td").first.inner_text() == str(seqs[-200])
    page.click("#earlier-events")
    page.wait_for_function(
        f"() => document.querySelectorAll('#history-rows tr').length === {len(seqs)}",
        timeout=5000,
    )
    shown = page.locator("#history-rows tr td:first-child").all_inner_texts()
    assert shown == [str(s) for s in seqs]
    assert page.locator("#earlier-events").count() == 0
    assert "saga_started" in rows.first.inner_text()
    edges = page.locator("#dag line.edge").evaluate_all(
        "ls => ls.map(l => l.dataset.from + '>' + l.dataset.to).sort()"
    )
    assert edges == ["left>finish", "prepare>left", "prepare>right", "right>finish"]
    output = page.locator("#steps tr[data-step=left] td.data").first
    box = output.bounding_box()
    assert box is not None and box["width"] >= 300  # a long output gets room to be read
    output.locator("summary").click()  # a long one is folded to a line; a click opens it
    assert "wh-11" in output.locator("pre").inner_text()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.locator("#steps").screenshot(path=str(ARTIFACTS / "steps-table.png"))
