"""A signal stops `python -m bench` with 128 + its number, even when a library masks it.

The benchmark raises `Interrupted` from its signal handler, in whatever code the
main thread runs. Code that cleans up in a `finally` and fails there (SQLAlchemy's
pool ping does, when cut short inside psycopg) replaces it with an error of its own;
the run is still an interrupted one, and its processes are still stopped.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

import bench.__main__ as bench_main


@pytest.fixture(autouse=True)
def _restore_signal_handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _run_that_cleans_up(masking: bool, cleaned: list[str]) -> Any:
    def run(args: Any, res: bench_main.Resources) -> int:
        res.push("a started process", lambda: cleaned.append("stopped"))
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs at the next bytecode: never reached
                pass
            return 0
        finally:
            if masking:
                raise RuntimeError("can't change 'autocommit' now: connection in transaction")

    return run


@pytest.mark.parametrize("masking", [False, True], ids=["plain", "masked by a library"])
def test_a_signal_returns_128_plus_its_number_and_cleans_up(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], masking: bool
) -> None:
    cleaned: list[str] = []
    monkeypatch.setattr(bench_main, "run", _run_that_cleans_up(masking, cleaned))
    assert bench_main.main(["--quick"]) == 128 + signal.SIGTERM
    assert cleaned == ["stopped"]
    err = capsys.readouterr().err
    assert "SIGTERM: stopping every process this run started" in err
    assert ("surfaced as RuntimeError" in err) is masking


def test_an_error_without_a_signal_is_not_taken_for_one(monkeypatch: pytest.MonkeyPatch) -> None:
    def run(args: Any, res: bench_main.Resources) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(bench_main, "run", run)
    with pytest.raises(RuntimeError, match="a bug"):
        bench_main.main(["--quick"])
