"""A report as a list of blocks, rendered to markdown (``summary.md``) and to one self-contained HTML file.

Both renderings come from the same blocks, so they hold the same numbers. The HTML
inlines its images as base64 ``data:`` URIs and its style sheet, and references nothing
outside itself: it can be mailed or archived as one file and opened offline.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Block", "Bullets", "Heading", "Image", "Para", "Table", "to_html", "to_markdown"]


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Image:
    """A PNG written next to the report; ``path`` is the file, ``alt`` its caption."""

    path: Path
    alt: str


Block = Heading | Para | Bullets | Table | Image


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block]) -> str:
    """The blocks as markdown; images are linked by file name (they sit beside ``summary.md``)."""
    lines: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            lines += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            lines += [b.text, ""]
        elif isinstance(b, Bullets):
            lines += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):
            lines.append("| " + " | ".join(_md_cell(c) for c in b.header) + " |")
            lines.append("|" + "---|" * len(b.header))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            lines.append("")
        else:
            lines += [f"![{b.alt}]({b.path.name})", ""]
    return "\n".join(lines)


_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
img { max-width: 100%; display: block; margin: 0.5em 0 0.2em; }
figcaption { color: #666; font-size: 0.85em; margin-bottom: 1.5em; }
"""


def to_html(blocks: Sequence[Block], title: str) -> str:
    """The blocks as one HTML document, each image inlined as a base64 PNG ``data:`` URI."""
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head><body>",
    ]
    for b in blocks:
        if isinstance(b, Heading):
            level = min(max(b.level, 1), 6)
            out.append(f"<h{level}>{esc(b.text)}</h{level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{esc(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{esc(c)}</th>" for c in b.header)
            body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            out.append(
                f'<figure><img alt="{esc(b.alt)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(b.alt)}</figcaption></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out) + "\n"
