"""A gate report as text for a CI log, JSON for machines, or Markdown for a PR comment.

Keys and captions are written by whoever made the data, possibly the attacker: they are reduced
to one printable line (no newline can start a GitHub Actions workflow command such as
``::add-mask::``), and escaped for Markdown so that a caption cannot inject links, images, HTML
or @mentions into a pull request.
"""

from __future__ import annotations

import json
import re

from clipguard.filtering.gate import GateReport, caption_snippet
from clipguard.filtering.threshold import FLAG_RULE, describe_fingerprint

KEY_CHARS = 60
# Mid-line, only these can start emphasis, code, links, images, tables or strikethrough.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]!|~])")


def render_json(report: GateReport) -> str:
    return json.dumps(report.to_dict(), indent=2)


def render_text(report: GateReport) -> str:
    lines = [f"clipguard gate: {report.verdict.upper()}" + (f" - {report.failures[0]}" if report.failures else "")]
    lines += [f"  also: {failure}" for failure in report.failures[1:]]
    lines.append(f"pairs      {report.pairs:,} in {len(report.shards)} shard(s): {report.ok:,} scored, {report.errors:,} errors")
    lines.append(
        f"flagged    {report.flagged:,} of {report.ok:,} scored = {_rate(report.flagged_rate)}"
        f"   max {report.policy.max_flagged_rate:.3%}   {_mark(_flagged_ok(report))}"
    )
    lines.append(
        f"errors     {report.errors:,} of {report.pairs:,} = {report.error_rate:.3%}"
        f"   max {report.policy.max_error_rate:.3%}   {_mark(_errors_ok(report))}"
        + (f"   ({_reasons(report)})" if report.errors_by_reason else "")
    )
    if report.audit is not None:
        lines.append(
            f"findings   {_findings_count(report)} in these shards   max {_max_findings(report)}   "
            f"{_mark(_findings_ok(report))}" + "".join(f"\n  - {_line(name)}" for name in report.audit["findings"][:10])
        )
        lines += [f"  {kind}: {count} finding(s)   max {limit}   {_mark(count <= limit)}" for kind, count, limit in _kind_limits(report)]
        lines.append(f"flagged by {_flagged_by(report)}")
    lines.append(f"threshold  gamma {report.threshold.gamma:.4f} from {_line(report.threshold.source)}; flagged when {FLAG_RULE}")
    lines.append(f"model      {describe_fingerprint(report.fingerprint)}")
    lines.append(f"scores     {_scores_origin(report)}")
    truncated = [s.shard for s in report.shards if s.truncated]
    if truncated:
        lines.append(f"truncated  {', '.join(_line(s) for s in truncated)}")
    if report.top_flagged:
        lines.append("top flagged pairs (highest distance first):")
        for example in report.top_flagged:
            caption = f'"{example.caption}"' if example.caption is not None else "(no caption)"
            lines.append(f"  {example.distance:.4f}  {_line(example.shard)}  {_line(example.key, KEY_CHARS)}  {caption}")
            lines += [f"    {name} {_line(value)}" for name, value in (("uid", example.uid), ("url", example.url)) if value]
    return "\n".join(lines) + "\n"


def render_markdown(report: GateReport) -> str:
    icon = "✅" if report.passed else "❌"
    lines = [f"### {icon} clipguard gate: {report.verdict.upper()}", ""]
    lines += [f"- {failure}" for failure in report.failures]
    if report.failures:
        lines.append("")
    lines += [
        "| check | observed | policy | result |",
        "|---|---|---|---|",
        f"| flagged rate | {report.flagged:,} of {report.ok:,} scored pairs = {_rate(report.flagged_rate)} "
        f"| ≤ {report.policy.max_flagged_rate:.3%} | {_md_mark(_flagged_ok(report))} |",
        f"| error rate | {report.errors:,} of {report.pairs:,} pairs = {report.error_rate:.3%} "
        f"| ≤ {report.policy.max_error_rate:.3%} | {_md_mark(_errors_ok(report))} |",
    ]
    if report.audit is not None:
        lines.append(f"| audit findings | {_findings_count(report)} in these shards | ≤ {_max_findings(report)} "
                     f"| {_md_mark(_findings_ok(report))} |")
        lines += [f"| {kind} findings | {count} | ≤ {limit} | {_md_mark(count <= limit)} |" for kind, count, limit in _kind_limits(report)]
    lines += [
        "",
        f"- pairs: {report.pairs:,} in {len(report.shards)} shard(s)"
        + (f"; errors by reason: {_reasons(report)}" if report.errors_by_reason else ""),
        f"- threshold: γ = {report.threshold.gamma:.4f} from {_md(report.threshold.source)}; "
        f"a pair is flagged when `{FLAG_RULE}`",
        f"- model: {_md(describe_fingerprint(report.fingerprint))}",
        f"- scores: {_scores_origin(report)}",
    ]
    if report.audit is not None:
        lines.append(f"- flagged by: {_md(_flagged_by(report))}")
        lines += [f"- finding: {_md(name)}" for name in report.audit["findings"][:10]]
    truncated = [s.shard for s in report.shards if s.truncated]
    if truncated:
        lines.append(f"- truncated shards: {_md(', '.join(truncated))}")
    if report.top_flagged:
        # uid / url columns only for data that records them, so other tables stay as they were.
        sourced = any(e.uid or e.url for e in report.top_flagged)
        extra = " uid | url |" if sourced else ""
        lines += ["", "<details><summary>Top flagged pairs</summary>", "", f"| distance | shard | key | caption |{extra}",
                  "|---|---|---|---|" + ("---|---|" if sourced else "")]
        for example in report.top_flagged:
            caption = _md(example.caption) if example.caption is not None else "*(no caption)*"
            source = f" {_md(example.uid or '')} | {_md(example.url or '')} |" if sourced else ""
            lines.append(f"| {example.distance:.4f} | {_md(example.shard)} | {_md(_line(example.key, KEY_CHARS))} | {caption} |{source}")
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def _flagged_ok(report: GateReport) -> bool:
    return report.ok > 0 and not any(f.startswith("flagged rate") for f in report.failures)


def _findings_ok(report: GateReport) -> bool:
    """The findings without a limit of their own, against --max-findings."""
    limit = report.policy.max_findings
    return limit is None or _other_findings(report) <= limit


def _other_findings(report: GateReport) -> int:
    by_kind = (report.audit or {}).get("findings_by_kind") or {}
    own = {kind for kind, _ in report.policy.max_findings_of}
    return sum(count for kind, count in by_kind.items() if kind not in own)


def _max_findings(report: GateReport) -> str:
    limit = "no limit" if report.policy.max_findings is None else str(report.policy.max_findings)
    return f"{limit} of other kinds" if report.policy.max_findings_of else limit


def _findings_count(report: GateReport) -> str:
    total = len(report.audit["findings"])
    return f"{total} ({_other_findings(report)} of other kinds)" if report.policy.max_findings_of else str(total)


def _kind_limits(report: GateReport) -> list[tuple[str, int, int]]:
    """(kind, findings of that kind in these shards, its own limit) for each --max-findings-of."""
    by_kind = (report.audit or {}).get("findings_by_kind") or {}
    return [(kind, by_kind.get(kind, 0), limit) for kind, limit in report.policy.max_findings_of]


def _flagged_by(report: GateReport) -> str:
    """Flagged pairs by rule (distance, finding, a signal); a pair flagged by two counts under both."""
    by = (report.audit or {}).get("flagged_by") or {}
    return ", ".join(f"{name} {count:,}" for name, count in by.items()) or "nothing"


def _errors_ok(report: GateReport) -> bool:
    return not any(f.startswith("error rate") for f in report.failures)


def _rate(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.3%}"


def _mark(ok: bool) -> str:
    return "ok" if ok else "FAIL"


def _md_mark(ok: bool) -> str:
    return "✅" if ok else "❌"


def _reasons(report: GateReport) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in report.errors_by_reason.items())


def _scores_origin(report: GateReport) -> str:
    reused = sum(s.scores == "reused" for s in report.shards)
    return f"{reused} shard(s) reused from --scores, {len(report.shards) - reused} scored in this run"


def _line(text: str, limit: int = 200) -> str:
    return caption_snippet(text, limit) or ""


def _md(text: str) -> str:
    """Escape Markdown and HTML, and defuse @mentions, in text that reaches a PR comment."""
    text = _line(text, 400)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _MARKDOWN_SPECIAL.sub(r"\\\1", text)
    return text.replace("@", "&#64;")
