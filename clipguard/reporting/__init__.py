"""The audit report: one self-contained HTML page a person reads before a scrape ships.

contents.py gathers (score folder, calibration, audit findings, filter results, labels) into
dataclasses; readback.py reads thumbnails and captions back from the shards; figures.py draws;
html.py renders; report.py writes the file. findings.py defines the audit findings format.
"""

# Loaded on first use: `audit` writes findings.json through findings.py, and gathering a report
# reaches the filter and the model loader (torch, ~700 MB resident) that the audit never needs.
_PUBLIC = {
    "AuditFormatError": "clipguard.reporting.findings",
    "read_findings": "clipguard.reporting.findings",
    "ReportData": "clipguard.reporting.contents",
    "ReportError": "clipguard.reporting.contents",
    "ReportRequest": "clipguard.reporting.contents",
    "gather_report": "clipguard.reporting.contents",
    "WrittenReport": "clipguard.reporting.report",
    "write_report": "clipguard.reporting.report",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'clipguard.reporting' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
