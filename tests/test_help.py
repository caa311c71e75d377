"""Every command's ``--help`` shows an example (built-in, plugin and nested commands alike)."""

from __future__ import annotations

from collections.abc import Iterator

import click
from click.testing import CliRunner

from tunneld.cli import cli


def walk(command: click.Command, path: list[str]) -> Iterator[tuple[list[str], click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None, name
            yield from walk(sub, [*path, name])


def test_every_help_has_an_example() -> None:
    runner = CliRunner()
    missing = []
    commands = list(walk(cli, []))
    assert len(commands) > 40  # the plugins' commands and the api subcommands are in the walk
    for path, _command in commands:
        res = runner.invoke(cli, [*path, "--help"])
        assert res.exit_code == 0, (path, res.output)
        if "Example" not in res.output:
            missing.append(" ".join(["tunneld", *path]))
    assert missing == [], f"--help without an example: {missing}"
