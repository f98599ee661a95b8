"""One grammar for a duration's text: settings and `gc --older-than` (config), relative
times (`ls --since 2h`), and the testkit's clock read the same texts the same way."""

from __future__ import annotations

from datetime import timedelta

import pytest

from sagaline.config import parse_duration
from sagaline.testkit import parse_duration as clock_duration
from sagaline.views import parse_when

NOW = 1_767_225_600.0
TEXTS = [
    ("90s", 90.0),
    ("45m", 2700.0),
    ("59min", 3540.0),
    ("12H", 43200.0),
    ("2h30m", 9000.0),
    ("2h 30m", 9000.0),
    ("1.5h", 5400.0),
    ("250ms", 0.25),
    ("30sec", 30.0),
    ("30d", 2_592_000.0),
    ("2w", 1_209_600.0),
]


@pytest.mark.parametrize(("text", "seconds"), TEXTS)
def test_every_reader_of_a_duration_reads_it_alike(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert clock_duration(text) == seconds
    assert parse_when(text, NOW) == NOW - seconds


@pytest.mark.parametrize("bad", ["", "h", "-1h", "1 fortnight", "2h30", "1.h", "1m s"])
def test_text_that_is_no_duration_is_refused_by_every_reader(bad: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)
    with pytest.raises(ValueError, match="duration"):
        clock_duration(bad)
    with pytest.raises(ValueError, match="neither an ISO time nor a relative one"):
        parse_when(bad, NOW)


def test_a_bare_number_is_seconds_to_settings_only() -> None:
    assert parse_duration("3600") == parse_duration(3600) == 3600.0
    with pytest.raises(ValueError, match="not a duration"):
        clock_duration("3600")
    with pytest.raises(ValueError, match="neither an ISO time nor a relative one"):
        parse_when("3600", NOW)


def test_the_testkit_takes_numbers_and_timedeltas_and_refuses_negatives() -> None:
    assert clock_duration(5) == 5.0 and clock_duration(0.25) == 0.25
    assert clock_duration(timedelta(minutes=2)) == 120.0
    with pytest.raises(ValueError, match="negative"):
        clock_duration(-1)
    with pytest.raises(TypeError):
        clock_duration(True)
