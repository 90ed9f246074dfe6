"""The documentation is part of the product: keep the README and docs/ in step with the code.

The README is the front door (short, with the quick start and a map of the
pages); docs/ is the site that `make docs` builds with `mkdocs build --strict`.
These checks need no broker.
"""

from __future__ import annotations

import ast
import html
import importlib.util
import re
import unicodedata
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import yaml
from click.testing import CliRunner

from common.config import settings_table
from emdc.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README_PATH = ROOT / "README.md"
README = README_PATH.read_text()
README_LIMIT = 12288  # bytes
# docs/changelog.md is the top-level CHANGELOG.md, included by the hook; the README links that file.
GENERATED_PAGES = {"changelog.md": "CHANGELOG.md"}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def load_hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("emdc_docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nav_pages() -> list[str]:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages: list[str] = []

    def walk(entry: Any) -> None:
        if isinstance(entry, str):
            pages.append(entry)
        elif isinstance(entry, list):
            for item in entry:
                walk(item)
        elif isinstance(entry, dict):
            for value in entry.values():
                walk(value)

    walk(config["nav"])
    return pages


def slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) gives a heading."""
    text = re.sub(r"[`*_]", "", heading).strip()
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(markdown: str) -> set[str]:
    found, fenced = set(), False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6}\s+(.*?)\s*#*$", line)):
            found.add(slug(match.group(1)))
    return found


def readme_links() -> list[str]:
    return [target for target in LINK.findall(README) if not re.match(r"[a-z]+:", target)]


def test_readme_is_short() -> None:
    size = len(README.encode())
    assert size <= README_LIMIT, f"README.md is {size} bytes, at most {README_LIMIT}: move detail to docs/"


def test_quick_start_shows_the_two_commands() -> None:
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make simulate" in quick_start and "make test" in quick_start


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    nav = nav_pages()
    on_disk = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}
    assert len(nav) == len(set(nav)), f"pages listed twice in mkdocs.yml: {nav}"
    assert sorted(on_disk - set(nav)) == [], "add these pages to mkdocs.yml's nav"
    assert sorted(set(nav) - on_disk) == [], "mkdocs.yml's nav lists pages that do not exist"


def test_every_readme_link_resolves() -> None:
    broken = []
    for target in readme_links():
        path, _, anchor = target.partition("#")
        file = ROOT / path if path else README_PATH
        if not file.exists() or (anchor and anchor not in anchors(file.read_text())):
            broken.append(target)
    assert broken == [], f"README links that do not resolve: {broken}"


def test_the_readme_maps_every_docs_page() -> None:
    linked = {target.partition("#")[0] for target in readme_links()}
    pages = {f"docs/{page}" for page in nav_pages() if page not in GENERATED_PAGES}
    pages |= set(GENERATED_PAGES.values())
    assert sorted(pages - linked) == [], "link these pages from the README's documentation map"


def test_the_images_are_shown() -> None:
    assert "docs/images/wiring.svg" in README
    assert "images/wiring.svg" in (DOCS / "install-pi.md").read_text()
    assert "report-week.png" in (DOCS / "reports.md").read_text()
    energy = ("images/energy-outage-as-booked.png", "images/energy-outage-corrected.png")
    assert all(image in (DOCS / "home-assistant.md").read_text() for image in energy)
    for image in ("images/wiring.svg", "report-week.png", *energy):
        assert (DOCS / image).is_file()


def test_every_command_is_documented_and_has_help() -> None:
    commands_page = (DOCS / "commands.md").read_text()
    runner = CliRunner()
    commands: list[str] = []

    def walk(group: click.Group, ctx: click.Context, prefix: str) -> None:
        # list_commands/get_command, not .commands: the root group loads its commands lazily.
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            assert command is not None, f"{prefix}{name} is listed but cannot be loaded"
            if isinstance(command, click.Group):
                walk(command, click.Context(command, info_name=name, parent=ctx), f"{prefix}{name} ")
            else:
                commands.append(f"{prefix}{name}")

    walk(main, click.Context(main, info_name="emdc"), "emdc ")
    assert len(commands) >= 10
    for command in commands:
        assert f"`{command}" in commands_page, f"{command} is missing from docs/commands.md"
        result = runner.invoke(main, [*command.split()[1:], "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, f"{command} --help: {result.output}"


def test_the_configuration_table_lists_every_setting() -> None:
    hooks = load_hooks()
    assert hooks.MARKER in (DOCS / "configuration.md").read_text()
    table = hooks.render_settings_table()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == len(settings_table())
    for key, env, _default, description in settings_table():
        assert f"`{key}`" in table and f"`{env}`" in table, f"{key} / {env} missing from the generated table"
        assert html.escape(description, quote=False) in table, f"{key}'s description missing from the table"
    rendered = hooks.on_page_markdown((DOCS / "configuration.md").read_text(), None, None, None)
    assert hooks.MARKER not in rendered and "`EMDC_AMQP_URL_FILE`" in rendered


def test_product_docs_have_no_internal_words() -> None:
    texts = {"README.md": README, "CHANGELOG.md": (ROOT / "CHANGELOG.md").read_text()}
    texts |= {f"docs/{p.relative_to(DOCS).as_posix()}": p.read_text() for p in DOCS.rglob("*.md")}
    texts["docs/images/wiring.svg"] = (DOCS / "images/wiring.svg").read_text()
    words = re.compile(r"sirius|carina|luca-cazzulo|\bthe seed\b|\bseed's\b|\bthis round\b|\bissues?\b", re.I)
    found = {name: sorted(set(words.findall(text))) for name, text in texts.items() if words.search(text)}
    assert found == {}


def test_a_malformed_meter_reading_is_a_usage_error_not_a_traceback() -> None:
    result = CliRunner().invoke(main, ["state", "set-total", "--meter", "main", "--channel", "active",
                                       "--kwh", "abc"])
    assert result.exit_code == 2
    assert "'abc' is not a decimal number" in result.output


def test_the_inputs_tables_list_every_key_with_each_types_defaults() -> None:
    from common.inputs import INPUT_KEYS, INPUT_TYPES

    hooks = load_hooks()
    assert "<!-- inputs-table -->" in (DOCS / "configuration.md").read_text()
    for kind in INPUT_TYPES:
        page = (DOCS / f"input-{kind}.md").read_text()
        assert f"<!-- inputs-table: {kind} -->" in page and "[[inputs]]" in page
        assert "## Home Assistant Energy dashboard" in page
        rendered = hooks.on_page_markdown(page, None, None, None)
        assert "<!-- inputs-table" not in rendered
        table = hooks.render_inputs_table(kind)
        assert f"| `min_pulse_ms` | float | `{INPUT_TYPES[kind].min_pulse_ms:g}` |" in table
        assert f"| `bounce_ms` | float | `{INPUT_TYPES[kind].bounce_ms:g}` |" in table
    generic = hooks.render_inputs_table()
    for key, (_type, _default, description) in INPUT_KEYS.items():
        assert f"| `{key}` |" in generic and html.escape(description, quote=False) in generic


# What a user meets: the errors commands and services stop with, doctor's failed checks, warnings and errors logged.
USER_ERRORS = {"ConfigError", "ConfigurationError", "ClickException", "UsageError", "BadParameter", "StateError",
               "MqttFailure", "GpioUnavailable", "DatabaseError", "SchemaError", "OutboxError", "MigrationRefused",
               "HeartbeatStale", "TimeoutError"}
LOGGED = {"warning", "error", "critical", "exception"}
PERCENT = re.compile(r"%[-+ #0]*\d*(?:\.\d+)?[sdrfg]")


def _literal_runs(node: ast.expr) -> list[str]:
    """The literal text of a message between its placeholders (f-string fields, %-formats)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return PERCENT.split(node.value)
    if isinstance(node, ast.JoinedStr):
        runs, run = [], ""
        for value in node.values:
            if isinstance(value, ast.Constant):
                run += value.value
            else:
                runs.append(run)
                run = ""
        return [*runs, run]
    return []


def leading_phrase(node: ast.expr) -> str | None:
    """A message's distinctive phrase: its first literal run of a few words, cut to about 30 characters.

    >>> leading_phrase(ast.parse('f"{where}: GPIO{pin} is already the pin of {other}"', mode="eval").body)
    'is already the pin of'
    """
    for run in _literal_runs(node):
        run = re.sub(r"\s+", " ", run).strip(" :;,.()'\"`")
        if len(run) >= 12 and " " in run:
            phrase = ""
            for word in run.split(" "):
                if len(phrase) >= 30:
                    break
                phrase = f"{phrase} {word}".strip()
            return phrase
    return None


def user_messages() -> list[tuple[str, str]]:
    """(file:line, leading phrase) of every message the product's code shows a user."""
    found = []
    for package in ("common", "edge", "backend", "emdc"):
        for path in sorted((ROOT / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                message = None
                if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
                    func = node.exc.func
                    # A bare name or click's: sqlite3.DatabaseError and the like are caught and reworded.
                    name = func.id if isinstance(func, ast.Name) else \
                        func.attr if isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "click" \
                        else ""
                    if name in USER_ERRORS:
                        message = node.exc.args[0]
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "bad" \
                        and len(node.args) >= 2:
                    message = node.args[1]  # a failed doctor check: bad(name, what, fix)
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr in LOGGED and getattr(node.func.value, "id", "") == "log" and node.args:
                    message = node.args[0]
                if message is not None and (phrase := leading_phrase(message)):
                    found.append((f"{path.relative_to(ROOT)}:{node.lineno}", phrase))
    return found


def test_troubleshooting_lists_every_message_a_user_can_meet() -> None:
    page = (DOCS / "troubleshooting.md").read_text()
    assert page.startswith("# Troubleshooting\n\n## Start with `emdc doctor`")
    text = re.sub(r"\s+", " ", page.replace("`", ""))
    messages = user_messages()
    assert len(messages) > 100  # the extraction still finds them
    missing = [f"{where}: {phrase!r}" for where, phrase in messages if phrase not in text]
    assert missing == [], "add these messages, with their fix, to docs/troubleshooting.md:\n" + "\n".join(missing)
