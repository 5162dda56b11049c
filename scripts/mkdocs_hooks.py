"""MkDocs hooks for the docs site (configured in mkdocs.yml).

The package's docstrings use Sphinx roles (:class:`Task`, :func:`~fedloom.run.simulate`), which
Markdown renders as the role's name followed by a code span. ``on_page_content`` drops the role
and, for a ``~``-prefixed target, keeps the last component, as Sphinx shows it.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|func|mod|meth|data|attr|exc|obj):(<code>)")
_TILDE = re.compile(r"<code>~(?:[\w.]+\.)?(\w+)</code>")


def on_page_content(html: str, **_: Any) -> str:
    """The page's HTML with Sphinx roles rendered as plain code spans."""
    return _TILDE.sub(r"<code>\1</code>", _ROLE.sub(r"\1", html))
