"""Regenerate the configuration reference embedded in README.md from the schema.

    .venv/bin/python scripts/update_docs.py
"""

from __future__ import annotations

import re
from pathlib import Path

from fedloom.config import config_reference_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def render(text: str) -> str:
    block = f"{START}\n{config_reference_markdown()}{END}"
    return re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)


if __name__ == "__main__":
    README.write_text(render(README.read_text(encoding="utf-8")), encoding="utf-8")
