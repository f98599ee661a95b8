"""PostgreSQL's monthly event partitions: the migration that partitions a database in
place, months created ahead (and the DEFAULT partition when they were not), and the
drop of expired months that never takes a kept saga's events.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from sagaline.records import Event
from sagaline.stores import pg_partitions as pp
from sagaline.stores import sql_migrate
from sagaline.stores.rows import to_row
from sagaline.stores.schema import SCHEMA_REVISION, sagas, steps
from sagaline.stores.sql import SQLStore
from tests.harness import drop_database, shared_postgres_url
from tests.stores import make_state

pytestmark = pytest.mark.timeout(60)

PREVIOUS = "0008_step_depends_on"  # the revision before the partitions
DAY = 86400.0
NOW = time.time()
THIS_MONTH = pp.month_start(NOW)


def month_ts(offset: int, days: float = 3.0) -> float:
    """An instant `days` into the month `offset` months from this one."""
    return pp.add_months(THIS_MONTH, offset).timestamp() + days * DAY


@pytest.fixture
def db_url() -> Iterator[str]:
    url = shared_postgres_url(f"sagaline_test_part_{uuid.uuid4().hex[:10]}")
    try:
        yield url
    finally:
        drop_database(url)


def upgrade_to(url: str, revision: str, *, down: bool = False) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(sql_migrate.__file__).parent / "migrations"))
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            (command.downgrade if down else command.upgrade)(cfg, revision)
    finally:
        engine.dispose()


def add_saga(conn: sa.Connection, created_at: float, event_times: list[float]) -> str:
    """A saga row, its steps and one event at each of `event_times`, straight in the tables."""
    state = make_state(created_at=created_at)
    conn.execute(sagas.insert(), to_row(state.saga))
    conn.execute(steps.insert(), [to_row(s) for s in state.steps.values()])
    for i, ts in enumerate(event_times):
        conn.execute(
            sa.text(
                "INSERT INTO sagaline_events (saga_id, ts, kind, step, attempt, phase, detail) "
                "VALUES (:s, :ts, :k, 'a', 1, 'forward', CAST(:d AS JSON))"
            ),
            {"s": state.saga.saga_id, "ts": ts, "k": f"kind{i}", "d": f'{{"i": {i}}}'},
        )
    return state.saga.saga_id


def delete_saga_rows(store: SQLStore, saga_id: str) -> None:
    """What a gc batch deletes of a saga when its events go with their partition."""
    with store.engine.begin() as conn:
        conn.execute(steps.delete().where(steps.c.saga_id == saga_id))
        conn.execute(sagas.delete().where(sagas.c.saga_id == saga_id))


def partition_of_each_event(store: SQLStore) -> dict[int | None, str]:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT seq, tableoid::regclass::text FROM sagaline_events"))
        return {int(seq): str(name) for seq, name in rows}


def drop_expired(store: SQLStore, cutoff: float, **kw: float) -> list[str]:
    with store.engine.begin() as conn:
        return [p.name for p in pp.drop_expired_partitions(conn, cutoff, **kw)]


def test_upgrade_partitions_an_existing_history_in_place(db_url: str) -> None:
    upgrade_to(db_url, PREVIOUS)
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        ids = [
            add_saga(conn, month_ts(-2), [month_ts(-2), month_ts(-2, 20), month_ts(-1, 1)]),
            add_saga(conn, month_ts(0, 0.5), [month_ts(0, 0.5), month_ts(0, 0.6)]),
            add_saga(conn, 1_000_000_000.0, [1_000_000_000.0]),  # September 2001
        ]
    engine.dispose()
    store = SQLStore(db_url)
    try:
        store.migrate()  # to the head: partitions in place
        with store.engine.connect() as conn:
            assert sql_migrate.current_revision(conn) == SCHEMA_REVISION
            assert pp.is_partitioned(conn)
            parts = pp.list_partitions(conn)
            old_table = conn.execute(
                sa.text("SELECT to_regclass('sagaline_events_unpartitioned')")
            ).scalar()
        assert old_table is None
        names = [p.name for p in parts]
        assert names[-1] == pp.DEFAULT_PARTITION
        first, last = pp.add_months(THIS_MONTH, -2), pp.add_months(THIS_MONTH, pp.AHEAD_MONTHS)
        # The months that have events, this one and the next ones, and DEFAULT.
        months = [pp.add_months(first, k) for k in range(pp.AHEAD_MONTHS + 3)]
        assert names == [
            "sagaline_events_p200109",
            *[pp.partition_name(m) for m in months],
            pp.DEFAULT_PARTITION,
        ]
        assert months[-1] == last
        histories = [store.history(sid) for sid in ids]
        assert [[e.kind for e in h] for h in histories] == [
            ["kind0", "kind1", "kind2"],
            ["kind0", "kind1"],
            ["kind0"],
        ]
        assert histories[0][2].ts == month_ts(-1, 1) and histories[0][1].detail == {"i": 1}
        # Each event is in the partition of its month.
        where = partition_of_each_event(store)
        assert where[histories[0][0].seq] == pp.partition_name(first)
        assert where[histories[0][2].seq] == pp.partition_name(pp.add_months(first, 1))
        assert where[histories[2][0].seq] == "sagaline_events_p200109"
        # The sequence carries on: a new event comes after every old one.
        store.append_event(Event(ids[1], "later", NOW))
        after = store.history(ids[1])
        assert after[-1].kind == "later"
        assert (after[-1].seq or 0) > max(e.seq or 0 for h in histories for e in h)
    finally:
        store.close()


def test_downgrade_puts_the_history_back_in_one_table(db_url: str) -> None:
    store = SQLStore(db_url)
    try:
        store.migrate()
        with store.engine.begin() as conn:
            sid = add_saga(conn, month_ts(-1), [month_ts(-1), NOW])
        before = store.history(sid)
    finally:
        store.close()
    upgrade_to(db_url, PREVIOUS, down=True)
    store = SQLStore(db_url, auto_migrate=False)
    try:
        with store.engine.connect() as conn:
            assert sql_migrate.current_revision(conn) == PREVIOUS
            assert not pp.is_partitioned(conn)
            assert pp.list_partitions(conn) == []
        assert store.history(sid) == before
        store.migrate()  # and up again
        assert store.history(sid) == before
    finally:
        store.close()


def test_an_event_of_a_month_without_partition_is_kept_and_moved_when_it_is_created(
    db_url: str,
) -> None:
    store = SQLStore(db_url)
    try:
        store.migrate()
        far = month_ts(pp.AHEAD_MONTHS + 12, 10)  # no partition that far ahead
        with store.engine.begin() as conn:
            sid = add_saga(conn, NOW, [NOW])
        store.append_event(Event(sid, "far_ahead", far))
        assert store.history(sid)[-1].kind == "far_ahead"
        seq = store.history(sid)[-1].seq
        assert partition_of_each_event(store)[seq] == pp.DEFAULT_PARTITION
        # A month created later (by the sweeper's check) takes its rows out of DEFAULT.
        with store.engine.begin() as conn:
            created = pp.ensure_partitions(conn, far, ahead=0)
        assert [p.name for p in created] == [pp.partition_name(pp.month_start(far))]
        assert partition_of_each_event(store)[seq] == created[0].name
        assert [e.kind for e in store.history(sid)] == ["kind0", "far_ahead"]
        with store.engine.begin() as conn:  # nothing left to create
            assert pp.ensure_partitions(conn, far, ahead=0) == []
    finally:
        store.close()


def test_expired_months_are_dropped_only_once_no_kept_saga_has_events_in_them(
    db_url: str,
) -> None:
    store = SQLStore(db_url)
    try:
        store.migrate()
        with store.engine.begin() as conn:
            pp.ensure_partitions(conn, month_ts(-4), ahead=0)
            for k in (-3, -2, -1):
                pp.ensure_partitions(conn, month_ts(k), ahead=0)
            gone = add_saga(conn, month_ts(-4), [month_ts(-4), month_ts(-4, 1)])
            # Created just after month -2 began; its first event, written by a host whose
            # clock is 10 s behind, lies in month -3.
            boundary = pp.add_months(THIS_MONTH, -2).timestamp()
            kept = add_saga(conn, boundary + 5, [boundary - 5, boundary + 6, month_ts(-1)])
            recent = add_saga(conn, month_ts(0, 0.1), [month_ts(0, 0.1)])
        kept_history = store.history(kept)
        cutoff = month_ts(-1, 20)
        with store.engine.begin() as conn:
            # Still running: the gc keeps it, its events need row deletes.
            assert pp.row_delete_floor(conn, cutoff) is None
            conn.execute(
                sagas.update()
                .where(sagas.c.saga_id == gone)
                .values(status="COMPLETED", finished_at=month_ts(-4, 2))
            )
            # Finished: the gc deletes its rows, and its month can go with the DROP.
            floor = pp.row_delete_floor(conn, cutoff)
            assert floor == pp.add_months(THIS_MONTH, -3).timestamp()  # the end of month -4
            # ... unless the gc is for sagas of another name.
            assert pp.row_delete_floor(conn, cutoff, name="another") is None
        delete_saga_rows(store, gone)
        # Month -4 holds only the deleted saga's events; month -3 one of the kept saga's.
        assert drop_expired(store, cutoff) == [pp.partition_name(pp.add_months(THIS_MONTH, -4))]
        assert store.history(gone) == []
        assert store.history(kept) == kept_history
        assert drop_expired(store, cutoff) == []  # nothing more is safe to drop
        # Once the kept saga is deleted too, its months go, up to the cutoff only.
        delete_saga_rows(store, kept)
        assert drop_expired(store, cutoff) == [
            pp.partition_name(pp.add_months(THIS_MONTH, k)) for k in (-3, -2)
        ]
        assert [e.kind for e in store.history(kept)] == ["kind2"]  # in month -1
        # A month ending after the cutoff stays whatever is in it.
        delete_saga_rows(store, recent)
        assert drop_expired(store, month_ts(0, 5)) == [
            pp.partition_name(pp.add_months(THIS_MONTH, -1))
        ]
        assert [e.kind for e in store.history(recent)] == ["kind0"]
        with store.engine.connect() as conn:
            names = [p.name for p in pp.list_partitions(conn)]
        assert pp.partition_name(THIS_MONTH) in names and pp.DEFAULT_PARTITION in names
    finally:
        store.close()


def test_sqlite_keeps_its_events_table_unpartitioned(tmp_path: Path) -> None:
    store = SQLStore(f"sqlite:///{tmp_path}/state.db")
    try:
        store.migrate()
        with store.engine.begin() as conn:
            assert sql_migrate.current_revision(conn) == SCHEMA_REVISION
            assert not pp.is_partitioned(conn)
            assert pp.drop_expired_partitions(conn, NOW) == []
            assert pp.ensure_partitions(conn, NOW) == []
            assert pp.row_delete_floor(conn, NOW) is None
            sid = add_saga(conn, NOW, [NOW])
        assert [e.kind for e in store.history(sid)] == ["kind0"]
    finally:
        store.close()


def test_the_sweepers_hourly_pass_creates_the_months_ahead_again(db_url: str) -> None:
    store = SQLStore(db_url)
    try:
        store.find_due(NOW)  # the first use migrates and checks the months ahead
        next_month = pp.partition_name(pp.add_months(THIS_MONTH, 1))
        with store.engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE {next_month}"))
        store.find_due(NOW)  # not checked again within the hour
        with store.engine.connect() as conn:
            assert next_month not in [p.name for p in pp.list_partitions(conn)]
        assert store._months is not None
        store._months.checked = time.monotonic() - pp.CHECK_EVERY - 1
        store.find_due(NOW)
        with store.engine.connect() as conn:
            assert next_month in [p.name for p in pp.list_partitions(conn)]
    finally:
        store.close()


def test_gc_drops_the_months_it_emptied_and_deletes_the_other_events_row_by_row(
    db_url: str,
) -> None:
    store = SQLStore(db_url)
    try:
        store.migrate()
        with store.engine.begin() as conn:
            for k in (-4, -3, -2, -1):
                pp.ensure_partitions(conn, month_ts(k), ahead=0)
            old = add_saga(conn, month_ts(-4), [month_ts(-4), month_ts(-4, 1)])
            # Finished before the cutoff, but with an event in month -1, which a running
            # saga keeps: that event is deleted row by row.
            later = add_saga(conn, month_ts(-3), [month_ts(-3), month_ts(-1)])
            running = add_saga(conn, month_ts(-1), [month_ts(-1)])
            for sid, ended in ((old, month_ts(-4, 2)), (later, month_ts(-1, 1))):
                conn.execute(
                    sagas.update()
                    .where(sagas.c.saga_id == sid)
                    .values(status="COMPLETED", finished_at=ended)
                )
        running_history = store.history(running)
        cutoff = month_ts(-1, 20)
        dry = store.gc(cutoff, dry_run=True)
        assert (dry.total, dry.events, dry.partitions) == (2, 4, [])
        report = store.gc(cutoff)
        assert report.total == 2
        # Months -4 to -2 held only the deleted sagas' events (or none): dropped, and
        # their events not counted.
        assert report.partitions == [
            pp.partition_name(pp.add_months(THIS_MONTH, k)) for k in (-4, -3, -2)
        ]
        assert report.events == 1  # `later`'s event in month -1
        assert store.history(old) == [] and store.history(later) == []
        assert store.history(running) == running_history
        with store.engine.connect() as conn:
            left = conn.execute(sa.text("SELECT count(*) FROM sagaline_events")).scalar()
        assert left == len(running_history)
    finally:
        store.close()


def test_a_gc_run_works_out_which_events_need_row_deletes_once_for_all_its_batches(
    db_url: str,
) -> None:
    store = SQLStore(db_url)
    floor_reads: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if "min(created_at)" in statement:  # pg_partitions.row_delete_floor's read
            floor_reads.append(statement)

    try:
        store.migrate()
        with store.engine.begin() as conn:
            for k in (-4, -3, -2, -1):
                pp.ensure_partitions(conn, month_ts(k), ahead=0)
            done = [add_saga(conn, month_ts(k), [month_ts(k)]) for k in (-4, -3, -2)]
            running = add_saga(conn, month_ts(-1), [month_ts(-1)])
            conn.execute(
                sagas.update()
                .where(sagas.c.saga_id.in_(done))
                .values(status="COMPLETED", finished_at=month_ts(-2, 1))
            )
        sa.event.listen(store.engine, "before_cursor_execute", seen)
        assert store.gc(month_ts(-1, 20), batch_size=1, dry_run=True).batches == 3
        assert floor_reads == []  # a dry run deletes no row
        report = store.gc(month_ts(-1, 20), batch_size=1)
        assert (report.batches, report.total, report.events) == (3, 3, 0)
        assert len(floor_reads) == 1
        assert report.partitions == [
            pp.partition_name(pp.add_months(THIS_MONTH, k)) for k in (-4, -3, -2)
        ]
        assert [store.history(sid) for sid in done] == [[], [], []]
        assert len(store.history(running)) == 1
    finally:
        store.close()
