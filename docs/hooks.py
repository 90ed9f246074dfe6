"""MkDocs hook: pages that are generated from the code and the repository.

``docs/configuration.md`` holds the marker ``<!-- settings-table -->``; at
build time it is replaced by a table made from
:func:`common.config.settings_table`, so the documented keys, variables and
defaults are always the ones the program accepts. ``docs/changelog.md`` holds
``<!-- changelog -->``, replaced by the top-level ``CHANGELOG.md``, so the
changelog has one source. Registered in ``mkdocs.yml`` under ``hooks:``;
``tests/test_docs.py`` calls :func:`render_settings_table`.
"""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the hook runs inside mkdocs, maybe without the package installed
    sys.path.insert(0, str(ROOT))

MARKER = "<!-- settings-table -->"
CHANGELOG_MARKER = "<!-- changelog -->"
CHANGELOG = ROOT / "CHANGELOG.md"


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


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    """Replace the markers with the generated table and the changelog."""
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, render_settings_table())
    if CHANGELOG_MARKER in markdown:
        markdown = markdown.replace(CHANGELOG_MARKER, CHANGELOG.read_text())
    return markdown
