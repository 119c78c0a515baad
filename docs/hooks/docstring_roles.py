"""MkDocs hook: Sphinx cross-reference roles in docstrings (``:class:`~a.b.C```, ``:func:`f```) are
shown as the code they name, since mkdocstrings renders docstrings as Markdown and leaves the role
names in the text. A leading ``~`` keeps only the last dotted part, as Sphinx shows it."""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:py:)?(?:class|mod|func|meth|attr|data|exc|obj|const):<code>(~?)([^<]+)</code>")


def _code(match: re.Match) -> str:
    name = match.group(2)
    return f"<code>{name.rsplit('.', 1)[-1] if match.group(1) else name}</code>"


def on_page_content(html: str, page, config, files) -> str:
    return ROLE.sub(_code, html)
