"""The README is the front door: keep its reference parts in step with the code."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from common.cli import main
from common.config import settings_table

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    missing = [env for _, env, _, _ in settings_table() if f"`{env}`" not in README]
    assert missing == [], f"add these to the README's configuration table: {missing}"


def test_quick_start_shows_the_two_commands() -> None:
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make simulate" in quick_start and "make test" in quick_start


def test_every_command_is_documented_and_has_help() -> None:
    runner = CliRunner()
    commands = []

    def walk(group, prefix: str) -> None:
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                walk(command, f"{prefix}{name} ")
            else:
                commands.append(f"{prefix}{name}")

    walk(main, "emdc ")
    for command in commands:
        assert f"`{command}" in README, f"{command} is missing from the README's command table"
        result = runner.invoke(main, [*command.split()[1:], "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output


def test_a_malformed_meter_reading_is_a_usage_error_not_a_traceback() -> None:
    result = CliRunner().invoke(main, ["state", "set-total", "--meter", "main", "--channel", "active",
                                       "--kwh", "abc"])
    assert result.exit_code == 2
    assert "'abc' is not a decimal number" in result.output
