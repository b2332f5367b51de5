"""The run report: rounds numbered as the console numbers them, the page from its template
file, styled by the dashboard's stylesheet."""

from __future__ import annotations

import html.parser
import re
from pathlib import Path

import server.dashboard
from server.report import write_report
from tests.server.run_dir import write_run


class Tables(html.parser.HTMLParser):
    """The report's tables by the heading above them: rows of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.styles: list[str] = []
        self._heading = self._cell = None
        self._where = ""

    def handle_starttag(self, tag, attrs):
        if tag in ("h2", "h3"):
            self._heading = ""
        elif tag == "tr":
            self.tables.setdefault(self._where, []).append([])
        elif tag == "td":
            self._cell = ""
        elif tag == "style":
            self.styles.append("")

    def handle_endtag(self, tag):
        if tag in ("h2", "h3"):
            self._where, self._heading = self._heading, None
        elif tag == "td":
            self.tables[self._where][-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._heading is not None:
            self._heading += data
        elif self._cell is not None:
            self._cell += data
        elif self.lasttag == "style":
            self.styles[-1] += data


def report(tmp_path: Path) -> tuple[str, Tables]:
    out = write_report(write_run(tmp_path / "run"))
    page = out.read_text(encoding="utf-8")
    tables = Tables()
    tables.feed(page)
    return page, tables


def first_column(rows: list[list[str]]) -> list[str]:
    return [r[0] for r in rows if r]  # (the header row has no td)


def test_report_numbers_rounds_like_the_console(tmp_path):
    _, t = report(tmp_path)
    assert first_column(t.tables["Rounds"]) == ["initial", "1", "2"]
    assert first_column(t.tables["Budget per device and round"]) == ["1", "1", "2"]
    assert first_column(t.tables["Devices that sat rounds out"]) == ["2"]
    assert first_column(t.tables["Rejected messages"]) == ["2"]


def test_report_is_its_template_with_the_dashboards_stylesheet(tmp_path):
    page, t = report(tmp_path)
    package = Path(server.dashboard.__file__).parent
    template = (package / "templates" / "report.html").read_text(encoding="utf-8")
    css = (package / "static" / "dashboard.css").read_text(encoding="utf-8")
    assert page.startswith(template[:template.index("$")])
    assert css.strip() in [s.strip() for s in t.styles]  # inlined: the file opens from disk
    assert not any(f"${name}" in page for name in ("run", "summary", "stylesheet", "sections"))
    # plots: evaluation, bytes, outcomes, experts, devices
    assert page.count("data:image/png;base64,") == 5
    assert "<h1>HFedMoE run: run</h1>" in page and "2 rounds · 2 devices" in page
    assert first_column(t.tables["Per device"]) == ["laptop", "phone"]


def test_report_shows_which_device_trained_which_expert_and_the_overlap(tmp_path):
    page, t = report(tmp_path)
    # round, devices, Jaccard, overlap coefficient, experts trained, share of the 16 experts
    assert t.tables["Experts selected per round"][1:] == [
        ["1", "2", "0.500", "1.000", "2", "12.5%"],
        ["2", "1", "-", "-", "2", "12.5%"]]
    # a column per expert trained in the run, by layer then index; the last line counts
    assert re.findall(r"<th class='e'>([^<]+)</th>", page) == ["0:1", "1:2", "1:3"] * 2
    assert t.tables["Round 1"][1:] == [["laptop", "■", "", ""], ["phone", "■", "■", ""],
                                      ["devices", "2", "1", "0"]]
    assert t.tables["Round 2"][1:] == [["phone", "■", "", "■"], ["devices", "1", "0", "1"]]
    assert page.count("<details open>") == 1  # the last round's matrix
