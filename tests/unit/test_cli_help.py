"""The CLI's help: every command that takes `--store` says what it defaults to."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from sagaline.cli import cli


def commands_with(option: str) -> Iterator[list[str]]:
    """The argv of every (sub)command of `sagaline` that has `option`."""

    def walk(command: Any, path: list[str]) -> Iterator[list[str]]:
        if any(option in p.opts for p in command.params):
            yield path
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            yield from walk(sub, [*path, name])

    yield from walk(typer.main.get_command(cli), [])


STORE_COMMANDS = list(commands_with("--store"))


def test_the_commands_with_a_store_option_are_found() -> None:
    found = {" ".join(argv) for argv in STORE_COMMANDS}
    assert {"ls", "show", "gc", "web", "relay", "db upgrade", "outbox ls", "outbox retry"} <= found


@pytest.mark.parametrize("argv", STORE_COMMANDS, ids=" ".join)
def test_the_help_of_the_store_option_shows_its_default(argv: list[str]) -> None:
    result = CliRunner().invoke(
        cli, [*argv, "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"}
    )
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if "--store " in line)
    assert "[default: (" in line and "SQLite in $SAGALINE_HOME" in line, line


def test_the_relay_help_shows_where_its_routes_come_from() -> None:
    result = CliRunner().invoke(
        cli, ["relay", "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"}
    )
    line = next(line for line in result.output.splitlines() if "--route " in line)
    assert "[default: ($SAGALINE_OUTBOX_ROUTES" in line, line
