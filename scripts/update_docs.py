"""Regenerate the configuration reference embedded in docs/configuration.md from the schema.

    .venv/bin/python scripts/update_docs.py
"""

from __future__ import annotations

import re
from pathlib import Path

from fedloom.config import config_reference_markdown

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def render(text: str) -> str:
    """``text`` with the block between the markers replaced by the schema's current reference."""
    block = f"{START}\n{config_reference_markdown()}{END}"
    return re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)


if __name__ == "__main__":
    PAGE.write_text(render(PAGE.read_text(encoding="utf-8")), encoding="utf-8")
