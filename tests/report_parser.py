"""An HTML parser for the bundle's report (shared by tests/test_report.py and tests/test_pipeline_output.py)."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pandas as pd


class ReportParser(HTMLParser):
    """Collects the tables (by id, as rows of cell texts), the image sources and the sections' status."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.sections: dict[str, str] = {}
        self.conclusions: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._in_conclusions = False
        self._li: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = str(a.get("id"))
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
        elif tag == "img":
            self.images.append(str(a.get("src")))
        elif tag == "section":
            self.sections[str(a.get("id"))[len("sec-"):]] = str(a.get("data-status"))
        elif tag == "ul" and a.get("class") == "conclusions":
            self._in_conclusions = True
        elif tag == "li" and self._in_conclusions:
            self._li = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "li" and self._li is not None:
            self.conclusions.append("".join(self._li))
            self._li = None
        elif tag == "ul":
            self._in_conclusions = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._li is not None:
            self._li.append(data)


def parse(path: Path) -> ReportParser:
    p = ReportParser()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def table(parser: ReportParser, name: str) -> pd.DataFrame:
    rows = parser.tables[f"table-{name}"]
    return pd.DataFrame(rows[1:], columns=rows[0])
