"""One record mapping for every store: the SQL schema and the records agree, field by field."""

from __future__ import annotations

from dataclasses import fields

import pytest

from sagaline.records import PHASE_COLUMNS, Event, SagaRecord, StepRecord
from sagaline.states import CompensationStatus, Phase, SagaStatus, StepStatus
from sagaline.stores import schema
from sagaline.stores.rows import from_row, to_row

# Columns that are deliberately no record field, or fields that have no column.
# Empty today: a new entry needs a reason next to it.
COLUMNS_WITHOUT_FIELD: dict[str, set[str]] = {"sagas": set(), "steps": set(), "events": set()}
FIELDS_WITHOUT_COLUMN: dict[str, set[str]] = {"sagas": set(), "steps": set(), "events": set()}


@pytest.mark.parametrize(
    ("table", "record"), [("sagas", SagaRecord), ("steps", StepRecord), ("events", Event)]
)
def test_every_sql_column_is_a_record_field_and_back(table: str, record: type) -> None:
    columns = {c.name for c in getattr(schema, table).c}
    names = {f.name for f in fields(record)}
    assert columns - names == COLUMNS_WITHOUT_FIELD[table]
    assert names - columns == FIELDS_WITHOUT_COLUMN[table]


def test_phase_columns_name_step_fields_and_step_columns() -> None:
    names = {f.name for f in fields(StepRecord)}
    for cols in PHASE_COLUMNS.values():
        assert {cols.status, cols.attempt} <= names
        assert {cols.status, cols.attempt} <= set(schema.steps.c.keys())


@pytest.mark.parametrize("phase", list(Phase))
def test_a_step_reads_status_and_attempt_of_each_phase_from_its_own_fields(phase: Phase) -> None:
    rec = StepRecord(
        "s",
        "a",
        0,
        status=StepStatus.RUNNING,
        attempt=2,
        comp_status=CompensationStatus.DISPATCHED,
        comp_attempt=5,
    )
    forward = phase is Phase.FORWARD
    assert rec.status_for(phase) is (rec.status if forward else rec.comp_status)
    assert rec.attempt_for(phase) == (2 if forward else 5)
    assert rec.is_running(phase, 2) is forward
    assert rec.is_running(phase, 5) is False
    assert rec.is_dispatched(phase, 5) is not forward
    assert rec.is_dispatched(phase, 2) is False


def test_rows_keep_enums_as_values_and_read_them_back_as_enums() -> None:
    step = StepRecord(
        "s",
        "a",
        0,
        status=StepStatus.RUNNING,
        comp_status=CompensationStatus.COMPENSATED,
        has_compensation_data=True,
    )
    row = to_row(step)
    assert row["status"] == "RUNNING" and type(row["status"]) is str
    assert row["comp_status"] == "COMPENSATED" and type(row["comp_status"]) is str
    # Drivers may return a boolean as 0/1.
    back = from_row(StepRecord, {**row, "has_compensation_data": 1})
    assert back == step and back.has_compensation_data is True
    saga = SagaRecord("s", "n", SagaStatus.FAILED, {"x": 1}, "f", 1.0, 2.0)
    assert from_row(SagaRecord, to_row(saga)) == saga
    assert from_row(SagaRecord, to_row(saga)).status is SagaStatus.FAILED


def test_rows_ignore_unknown_keys_and_default_missing_fields() -> None:
    row = to_row(StepRecord("s", "a", 0, redispatches=3))
    del row["redispatches"]
    row["written_by_a_newer_version"] = True
    assert from_row(StepRecord, row) == StepRecord("s", "a", 0)
