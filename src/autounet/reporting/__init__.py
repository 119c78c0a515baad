"""A readable summary of a dataset's workspace: ``W/NAME/report.md``, pictures in ``W/NAME/report/``.

One module per section, all reading the documents :mod:`~autounet.reporting.context` loads:
``fingerprint`` (the dataset), ``plans``, ``training`` (folds, cross-validation, curves),
``selection`` with ``postprocessing`` (ranking, winner, the post-processing evidence) and
``example`` (a validation case with its prediction); ``report`` assembles them. ``html`` writes
``W/NAME/report.html``: the same summary with the training curves, every cross-validation case and
a case viewer, in one page (``html_cases``, ``markup``, and the page's ``page.js``/``page.css``). Every number
comes from those files; a section whose inputs are missing or unreadable becomes a one-line note.
"""

from autounet.reporting.context import read_log
from autounet.reporting.html import render_html, write_html_report
from autounet.reporting.report import render_report, write_report

__all__ = ["read_log", "render_html", "render_report", "write_html_report", "write_report"]
