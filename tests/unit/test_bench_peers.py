"""`python -m bench --peers`: the check for the peers' packages, and the comparison table.

A package is made missing the way Python itself allows: ``sys.modules[name] = None``
makes both ``import name`` and ``importlib.util.find_spec(name)`` fail.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

from bench.peers import EXTRA, PACKAGES, comparison_rows, missing_peers, require_peers


@pytest.mark.parametrize(
    ("blocked", "named"),
    [
        (["dbos"], "dbos is not installed"),
        (["celery_saga"], "celery-saga is not installed"),
        (["dbos", "celery_saga"], "dbos and celery-saga are not installed"),
    ],
)
def test_a_missing_peer_is_named_with_the_extra_that_installs_it(
    monkeypatch: pytest.MonkeyPatch, blocked: list[str], named: str
) -> None:
    others = [PACKAGES[m] for m in PACKAGES if m not in blocked]
    if set(others) & set(missing_peers()):
        pytest.skip(f"{others} not installed here: the message would name them too")
    for module in blocked:
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(SystemExit) as exc:
        require_peers()
    message = str(exc.value.code)
    assert named in message
    assert f"pip install -e '.[{EXTRA}]'" in message
    assert message.startswith("python -m bench --peers: ")


def test_installed_peers_pass_the_check() -> None:
    if missing_peers():
        pytest.skip(f"the {EXTRA} extra is not installed here")
    require_peers()


def _line(figure: str, store: str, peer: str | None = None, **values: float) -> dict[str, Any]:
    d: dict[str, Any] = {"figure": figure, "store": store, **values}
    if peer:
        d.update(peer=peer, system=f"{peer} 1.0")
    return d


def test_the_comparison_puts_each_peer_ratio_beside_sagalines() -> None:
    lines = [
        _line("L1", "postgres", sagaline_median_ms=20.0, baseline_median_ms=8.0, ratio_median=2.5),
        _line("T1", "postgres", sagaline_per_s=80.0, baseline_per_s=200.0, ratio_throughput=0.4),
        _line("S1", "postgres", sagaline_growth=1.0),  # not compared
        _line(
            "L1", "postgres", "dbos", peer_median_ms=55.0, baseline_median_ms=10.0, ratio_median=5.5
        ),
        _line(
            "T1", "postgres", "dbos", peer_per_s=130.0, baseline_per_s=260.0, ratio_throughput=0.5
        ),
        _line(
            "T1",
            "redis",
            "celery-saga",
            peer_per_s=100.0,
            baseline_per_s=250.0,
            ratio_throughput=0.4,
        ),
    ]
    rows = comparison_rows(lines)
    assert rows == [
        ("sagaline", "PostgreSQL", "20.0 ms vs 8.0 ms", "2.50x", "80/s vs 200/s", "0.40x"),
        ("dbos 1.0", "PostgreSQL", "55.0 ms vs 10.0 ms", "5.50x", "130/s vs 260/s", "0.50x"),
        ("celery-saga 1.0", "Redis", "", "", "100/s vs 250/s", "0.40x"),
    ]
