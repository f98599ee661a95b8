"""The README's Install tables name exactly the extras pyproject.toml declares."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]


def install_section() -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"^## Install\n(.*?)^## ", text, re.S | re.M)
    assert found is not None, "README has an '## Install' section"
    return found.group(1)


def declared_extras() -> set[str]:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(doc["project"]["optional-dependencies"])


def test_every_declared_extra_is_listed_and_every_listed_extra_exists() -> None:
    listed = set(re.findall(r"^\| `([a-z0-9-]+)` \|", install_section(), re.M))
    assert listed == declared_extras()


def test_the_combination_table_installs_only_declared_extras() -> None:
    cells = re.findall(r"`\.\[([a-z0-9,-]+)\]`", install_section())
    assert cells, "the combination table names extras"
    used = {extra for cell in cells for extra in cell.split(",")}
    assert used <= declared_extras()
    # A Redis broker always comes with the redis extra (kombu's Redis transport).
    redis_row = next(
        line for line in install_section().splitlines() if line.startswith("| Redis `redis://`")
    )
    assert all("redis" in cell for cell in re.findall(r"`(\.[^`]*)`", redis_row))
