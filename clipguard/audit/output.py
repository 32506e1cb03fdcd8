"""An audit's files: ``signals/<shard>.parquet`` (key, shard, one column per signal value),
``findings.json`` (the `clipguard.reporting.findings` format, with kind, goal, counts and each
pair's caption added) and ``findings.md`` for a person."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from clipguard.audit.columns import SignalColumns
from clipguard.audit.detect import Finding
from clipguard.audit.inputs import AuditPairs
from clipguard.reporting.findings import FINDINGS_FORMAT, FINDINGS_NAME, KIND_TITLES
from clipguard.scoring.scorefiles import atomic_write_bytes, atomic_write_json, write_parquet
from clipguard.signals.registry import AUDIT_SIGNALS_DIR

MARKDOWN_NAME = "findings.md"
MARKDOWN_PAIRS = 100  # per finding in findings.md; findings.json lists them all


def write_signals(out: Path, pairs: AuditPairs, columns: SignalColumns) -> list[Path]:
    """One parquet file per shard, its columns gathered for its rows only."""
    written = []
    for shard, rows in pairs.shard.rows():
        table = {"key": pairs.key.take(rows).cast(pa.string()),
                 "shard": pa.array([shard] * len(rows), pa.string())}
        for name in columns:
            picked = columns.rows(name, rows)
            if picked.dtype == object:
                table[name] = pa.array(picked.tolist(), pa.string())
            elif np.issubdtype(picked.dtype, np.integer):
                table[name] = pa.array(picked.astype(np.int64))
            else:
                table[name] = pa.array(picked.astype(np.float32))
        path = Path(out) / AUDIT_SIGNALS_DIR / f"{shard}.parquet"
        write_parquet(path, pa.table(table))
        written.append(path)
    # A rerun into the same folder over fewer shards must not leave another run's columns behind.
    for stale in set((Path(out) / AUDIT_SIGNALS_DIR).glob("*.parquet")) - set(written):
        stale.unlink()
    return written


def finding_record(finding: Finding, pairs: AuditPairs, captions: list[str]) -> dict:
    """``captions``: those of the finding's pairs, in its rows' order."""
    rows = finding.rows
    return {
        "name": f"{KIND_TITLES[finding.kind]}: {finding.goal}",
        "description": finding.description,
        "p_value": finding.p_value,
        "kind": finding.kind,
        "goal": finding.goal,
        "observed": finding.observed,
        "expected": finding.expected,
        "neglog10_p": round(finding.neglog10_p, 3),
        "tests": finding.tests,
        "pairs": [{"shard": str(pairs.shard[i]), "key": pairs.key[i], "caption": caption}
                  for i, caption in zip(rows, captions)],
    }


def write_findings(out: Path, pairs: AuditPairs, findings: list[Finding], summary: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # One read of the captions for every finding: each part's caption column is read once.
    captions = pairs.captions(np.concatenate([np.asarray(f.rows, np.int64) for f in findings])) if findings else []
    bounds = np.cumsum([0] + [len(f.rows) for f in findings])
    records = [finding_record(f, pairs, captions[bounds[i]:bounds[i + 1]]) for i, f in enumerate(findings)]
    atomic_write_json(out / FINDINGS_NAME, {"format": FINDINGS_FORMAT, **summary, "findings": records})
    atomic_write_bytes(out / MARKDOWN_NAME, _markdown(records, summary).encode("utf-8"))


def _markdown(records: list[dict], summary: dict) -> str:
    lines = ["# clipguard audit", "",
             f"{summary['pairs_audited']:,} pairs audited of {summary['pairs_scored']:,} scored "
             f"({summary['pairs_without_embeddings']:,} without embeddings); significance level "
             f"{summary['alpha']:g} after correction; {len(records)} finding(s).", ""]
    if not summary["classes"]:
        lines += ["No keyword file was given, so no class-based test ran (pass --keywords FILE).", ""]
    for rank, record in enumerate(records, 1):
        lines += [f"## {rank}. {record['name']}", "", record["description"], "",
                  "| shard | key | caption |", "|---|---|---|"]
        for pair in record["pairs"][:MARKDOWN_PAIRS]:
            caption = pair["caption"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {pair['shard']} | {pair['key']} | {caption} |")
        if len(record["pairs"]) > MARKDOWN_PAIRS:
            lines.append(f"| ... | {len(record['pairs']) - MARKDOWN_PAIRS} more in findings.json | |")
        lines.append("")
    seconds = summary.get("seconds") or {}
    if seconds:
        per = summary.get("seconds_per_10k_pairs", {})
        lines += ["## Cost", "", "| stage | seconds | per 10,000 pairs |", "|---|---:|---:|"]
        lines += [f"| {name} | {s:.2f} | {per.get(name, 0.0):.2f} |" for name, s in seconds.items()]
        lines.append("")
    return "\n".join(lines)



