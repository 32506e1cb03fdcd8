"""`clipguard report`: gather what was checked into ReportData, render it, write one HTML file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from clipguard.reporting.contents import ReportData, ReportRequest, gather_report
from clipguard.reporting.html import render_html


@dataclass(frozen=True)
class WrittenReport:
    path: Path
    bytes: int
    data: ReportData


def write_report(request: ReportRequest) -> WrittenReport:
    data = gather_report(request)
    page = render_html(data).encode("utf-8")
    path = Path(request.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed, so a reader never opens half a page.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(page)
    os.replace(tmp, path)
    return WrittenReport(path=path, bytes=len(page), data=data)
