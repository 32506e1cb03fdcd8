"""The audit report: one self-contained HTML page a person reads before a scrape ships.

contents.py gathers (score folder, calibration, audit findings, filter results, labels) into
dataclasses; readback.py reads thumbnails and captions back from the shards; figures.py draws;
html.py renders; report.py writes the file. findings.py defines the audit findings format.
"""

from clipguard.reporting.contents import ReportData, ReportError, ReportRequest, gather_report
from clipguard.reporting.findings import AuditFormatError, read_findings
from clipguard.reporting.report import WrittenReport, write_report

__all__ = ["AuditFormatError", "ReportData", "ReportError", "ReportRequest", "WrittenReport", "gather_report",
           "read_findings", "write_report"]
