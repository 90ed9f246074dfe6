"""MkDocs hook: pages that are generated from the code and the repository.

``docs/configuration.md`` holds the marker ``<!-- settings-table -->``; at
build time it is replaced by a table made from
:func:`common.config.settings_table`, so the documented keys, variables and
defaults are always the ones the program accepts. ``docs/changelog.md`` holds
``<!-- changelog -->``, replaced by the top-level ``CHANGELOG.md``, so the
changelog has one source. ``<!-- inputs-table -->`` becomes the table of the
keys of an ``[[inputs]]`` table (:data:`common.inputs.INPUT_KEYS`), and
``<!-- inputs-table: reed -->`` the same with one input type's defaults, on
that type's page. Registered in ``mkdocs.yml`` under ``hooks:``;
``tests/test_docs.py`` calls :func:`render_settings_table` and
:func:`render_inputs_table`.
"""

from __future__ import annotations

import html
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the hook runs inside mkdocs, maybe without the package installed
    sys.path.insert(0, str(ROOT))

MARKER = "<!-- settings-table -->"
CHANGELOG_MARKER = "<!-- changelog -->"
CHANGELOG = ROOT / "CHANGELOG.md"
INPUTS_MARKER = re.compile(r"<!-- inputs-table(?::\s*(\w+))?\s*-->")


def _secret_names() -> set[str]:
    """Settings whose value is a secret (they also accept a ``_FILE`` form)."""
    from dataclasses import fields

    from common import config

    return {f.name for f in fields(config.Config) if f.metadata.get("secret")}


def _toml_literal(value: Any) -> str:
    """A default as it would be written in the TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _cell(text: str) -> str:
    """Plain text made safe for a Markdown table cell (no HTML, no column breaks)."""
    return html.escape(text, quote=False).replace("|", "&#124;")


def render_settings_table() -> str:
    """The Markdown table of every setting: TOML key, environment variable, default, description."""
    from common.config import settings_table

    secrets = _secret_names()
    rows = [
        "| TOML key | Environment variable | Default | Description |",
        "| --- | --- | --- | --- |",
    ]
    for key, env, default, description in settings_table():
        if key in secrets:
            key_cell = f"`{key}`<br>`{key}_file`"
            env_cell = f"`{env}`<br>`{env}_FILE`"
        else:
            key_cell, env_cell = f"`{key}`", f"`{env}`"
        default_cell = f"`{_toml_literal(default)}`".replace("|", "&#124;")
        rows.append(f"| {key_cell} | {env_cell} | {default_cell} | {_cell(description)} |")
    return "\n".join(rows) + "\n"


def _type_default(kind: str, key: str) -> str:
    """What ``key`` defaults to for inputs of type ``kind``, as the page of that type shows it."""
    from common.channels import CHANNELS, channel_spec
    from common.inputs import INPUT_TYPES, derived_min_interval_ms

    preset = INPUT_TYPES[kind]
    if key == "type":
        return f"`{kind}` (required)"
    if key == "min_pulse_ms":
        return f"`{preset.min_pulse_ms:g}`"
    if key == "bounce_ms":
        return f"`{preset.bounce_ms:g}`"
    if key == "per_pulse":
        return ", ".join(f"{c} `{channel_spec(c).default_per_pulse:g}`" for c in CHANNELS)
    if key == "min_interval_ms":
        return "derived: " + ", ".join(
            f"{c} `{derived_min_interval_ms(c, channel_spec(c).default_per_pulse):g}`" for c in CHANNELS)
    return "required"


def render_inputs_table(kind: str | None = None) -> str:
    """The Markdown table of the keys of an ``[[inputs]]`` table; with ``kind``, that type's defaults."""
    from common.inputs import INPUT_KEYS

    rows = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for key, (value_type, default, description) in INPUT_KEYS.items():
        shown = _type_default(kind, key) if kind else _cell(default)
        rows.append(f"| `{key}` | {value_type.__name__} | {shown} | {_cell(description)} |")
    return "\n".join(rows) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    """Replace the markers with the generated table and the changelog."""
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, render_settings_table())
    markdown = INPUTS_MARKER.sub(lambda match: render_inputs_table(match.group(1)), markdown)
    if CHANGELOG_MARKER in markdown:
        markdown = markdown.replace(CHANGELOG_MARKER, CHANGELOG.read_text())
    return markdown
