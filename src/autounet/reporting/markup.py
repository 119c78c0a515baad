"""The report's Markdown sections as HTML: the small subset they use (paragraphs, lists, tables,
code blocks, ``###`` headings, bold, italic and code spans), every piece of text escaped."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

_SPAN = re.compile(r"\*\*(.+?)\*\*|`([^`]+)`|(?<![\w*])\*([^*]+)\*(?![\w*])")


def inline(text: str) -> str:
    """One line of Markdown text as escaped HTML with its bold, code and italic spans."""
    out, pos = [], 0
    for m in _SPAN.finditer(text):
        out.append(html.escape(text[pos : m.start()]))
        bold, code, italic = m.groups()
        if bold is not None:
            out.append(f"<strong>{inline(bold)}</strong>")
        elif code is not None:
            out.append(f"<code>{html.escape(code)}</code>")
        else:
            out.append(f"<em>{inline(italic)}</em>")
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def _cells(line: str) -> list[str]:
    inner = line.strip()[1:-1] if line.strip().endswith("|") else line.strip()[1:]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def _table(lines: Sequence[str]) -> str:
    head = _cells(lines[0])
    rule = _cells(lines[1]) if len(lines) > 1 else []
    right = [c.endswith(":") for c in rule]
    body = lines[2:] if len(lines) > 1 else []

    def cell(tag: str, text: str, i: int) -> str:
        cls = ' class="num"' if i < len(right) and right[i] else ""
        return f"<{tag}{cls}>{inline(text)}</{tag}>"

    rows = ["<tr>" + "".join(cell("th", h, i) for i, h in enumerate(head)) + "</tr>"]
    rows += ["<tr>" + "".join(cell("td", c, i) for i, c in enumerate(_cells(b))) + "</tr>" for b in body]
    return '<div class="scroll"><table>' + "".join(rows) + "</table></div>"


def markdown_html(lines: Sequence[str]) -> str:
    """HTML of a report section's lines."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append("<pre>" + html.escape("\n".join(lines[i + 1 : j])) + "</pre>")
            i = j + 1
        elif line.startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            out.append(_table(lines[i:j]))
            i = j
        elif line.startswith("- "):
            j = i
            while j < len(lines) and lines[j].startswith("- "):
                j += 1
            out.append("<ul>" + "".join(f"<li>{inline(x[2:])}</li>" for x in lines[i:j]) + "</ul>")
            i = j
        elif line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 5)
            out.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
            i += 1
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
            i += 1
        else:
            i += 1
    return "\n".join(out)
