"""The pages the server shows, kept as files (package data, see pyproject's
``[tool.setuptools.package-data]``), never as Python strings:

* ``server/dashboard/static/``: the live dashboard as a browser gets it -- ``index.html``,
  ``dashboard.css``, ``dashboard.js`` (:mod:`server.dashboard` serves them);
* ``server/dashboard/templates/report.html``: the run report's :class:`string.Template`
  (:mod:`server.report` fills it and inlines the dashboard's stylesheet, so that a report
  stays one self-contained file that opens from disk).
"""

from __future__ import annotations

from importlib.resources import files
from string import Template

_DASHBOARD = files("server") / "dashboard"
STATIC = _DASHBOARD / "static"
TEMPLATES = _DASHBOARD / "templates"


def static_file(name: str) -> bytes:
    """The bytes of the dashboard's static file ``name`` (a plain file name)."""
    return (STATIC / name).read_bytes()


def stylesheet() -> str:
    """The stylesheet the dashboard and the report share."""
    return static_file("dashboard.css").decode("utf-8")


def template(name: str) -> Template:
    """The page template ``name`` from ``server/dashboard/templates/``."""
    return Template((TEMPLATES / name).read_text(encoding="utf-8"))
