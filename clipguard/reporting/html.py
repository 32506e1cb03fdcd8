"""ReportData -> one self-contained HTML page: inline CSS, figures and thumbnails as data: URIs,
no script and no external reference, so it opens offline and can be attached to a ticket.

Every value from the data (captions, keys, reasons, file names) is escaped: captions come from
the web and a report must not run what a scraper picked up. Headline counts carry ids
(``summary-pairs``, ``summary-flagged``, ...) so that tests and scripts can read them back.
"""

from __future__ import annotations

import base64
import json
from html import escape
from typing import Any

import clipguard
from clipguard.filtering.threshold import FLAG_RULE
from clipguard.reporting.contents import (
    CalibrationSection,
    ClassTable,
    FilterSection,
    FindingView,
    PairView,
    ReportData,
    SignalTable,
)

CAPTION_CHARS = 240
MAX_SHARD_TABLE_ROWS = 200

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
main{max-width:1180px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:0 0 12px;border-bottom:1px solid #dde1e7;padding-bottom:6px}
h3{font-size:15px;margin:16px 0 8px}
section{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:18px 22px;margin:18px 0}
.meta{color:#5b6475;font-size:13px}
.verdict{border-radius:8px;padding:16px 22px;margin:18px 0;font-size:20px;font-weight:600;color:#fff}
.verdict ul{font-size:14px;font-weight:400;margin:8px 0 0;padding-left:20px}
.verdict-pass,.verdict-clean{background:#1e7f4f}.verdict-fail{background:#b3261e}
.verdict-review{background:#b86e00}.verdict-unknown{background:#5b6475}
.warn{background:#fff4d6;border:1px solid #e8c25a;border-radius:6px;padding:10px 16px;margin:12px 0;font-size:14px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:8px}
.card{background:#f7f8fa;border:1px solid #e3e6eb;border-radius:6px;padding:10px 16px;min-width:120px}
.card .n{font-size:24px;font-weight:700}.card .l{font-size:12px;color:#5b6475;text-transform:uppercase;letter-spacing:.04em}
table{border-collapse:collapse;font-size:13px;margin:6px 0 10px}
th,td{padding:4px 10px;border-bottom:1px solid #eceef2;text-align:left;vertical-align:top}
th{background:#f7f8fa;font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
code,.mono{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12px;word-break:break-all}
img.figure{max-width:100%;height:auto;border:1px solid #eceef2}
.pairs{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:14px}
.pair{border:1px solid #e3e6eb;border-radius:6px;padding:10px;background:#fafbfc}
.pair.flagged{border-color:#d98880;background:#fdf3f2}
.pair img,.placeholder{display:block;width:160px;height:160px;object-fit:contain;margin:0 auto 8px;background:#eceef2}
.placeholder{display:flex;align-items:center;justify-content:center;text-align:center;font-size:11px;color:#7a3b00;
  padding:8px;box-sizing:border-box;border:1px dashed #c9a15a;background:#fff8ec;word-break:break-word}
.caption{font-size:13px;margin:4px 0}.reason{font-size:12px;color:#5b6475}.reason.flag{color:#b3261e;font-weight:600}
.finding{border-top:1px solid #eceef2;padding-top:10px;margin-top:10px}
footer{font-size:12px;color:#5b6475;margin-top:24px}
"""


def render_html(data: ReportData) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        # No network: the page may load nothing from anywhere but itself (data: images, inline style).
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
        f"<title>{_e(data.title)}</title><style>{CSS}</style></head><body><main>",
        _header(data),
        _verdict(data),
        *[f'<div class="warn">{_e(w)}</div>' for w in data.warnings],
        _summary(data),
        _model(data),
        _distances(data),
        _shards(data),
        _signals(data),
        _worst(data),
        _errors(data),
    ]
    if data.findings is not None:
        parts.append(_findings(data))
    if data.classes is not None:
        parts.append(_classes(data.classes))
    if data.filter is not None:
        parts.append(_filter(data.filter))
    parts.append(_footer())
    parts.append("</main></body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Small helpers


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _n(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def _pct(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}%}"


def _f(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _png(data: bytes | None, alt: str) -> str:
    if not data:
        return ""
    return f'<img class="figure" alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def _table(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset(), table_id: str | None = None) -> str:
    """Cells are given already escaped / formatted; columns in ``numeric`` are right-aligned."""
    def cell(tag: str, i: int, value: str) -> str:
        return f'<{tag} class="num">{value}</{tag}>' if i in numeric else f"<{tag}>{value}</{tag}>"

    head = "".join(cell("th", i, _e(h)) for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    ident = f' id="{_e(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _card(label: str, value: str, ident: str, raw: Any) -> str:
    return (f'<div class="card"><div class="n" id="{ident}" data-value="{_e(raw)}">{value}</div>'
            f'<div class="l">{_e(label)}</div></div>')


# ---------------------------------------------------------------------------------------------
# Sections


def _header(data: ReportData) -> str:
    return (f"<h1>{_e(data.title)}</h1><div class=\"meta\">scores <code>{_e(data.scores)}</code> · "
            f"generated {_e(data.generated_at)} · clipguard {_e(clipguard.__version__)}</div>")


def _verdict(data: ReportData) -> str:
    v = data.verdict
    reasons = "".join(f"<li>{_e(r)}</li>" for r in v.reasons)
    return (f'<div class="verdict verdict-{_e(v.status)}" id="verdict" data-status="{_e(v.status)}">'
            f"{_e(v.headline)}{f'<ul>{reasons}</ul>' if reasons else ''}</div>")


def _summary(data: ReportData) -> str:
    s = data.summary
    cards = [
        _card("pairs", _n(s.pairs), "summary-pairs", s.pairs),
        _card("scored (ok)", _n(s.ok), "summary-ok", s.ok),
        _card("errors", _n(s.errors), "summary-errors", s.errors),
        _card("flagged", _n(s.flagged), "summary-flagged", "" if s.flagged is None else s.flagged),
        _card("flagged rate", _pct(s.flagged_rate, 3), "summary-flagged-rate",
              "" if s.flagged_rate is None else f"{s.flagged_rate:.6f}"),
        _card("gamma", _f(s.gamma), "summary-gamma", "" if s.gamma is None else s.gamma),
    ]
    gamma_line = (f"<p>A pair is flagged when <code>{_e(FLAG_RULE)}</code>; gamma from {_e(s.gamma_source)}. "
                  "The flagged rate is flagged / scored pairs; pairs that could not be scored are errors, "
                  "never flagged.</p>") if s.gamma is not None else \
        "<p>No threshold was given (--calibration, --gamma or a --filter run), so no pair is flagged.</p>"
    policy = ""
    if s.policy is not None:
        policy = (f"<p>Policy: flagged rate at most {_pct(s.policy.max_flagged_rate, 3)}, error rate at most "
                  f"{_pct(s.policy.max_error_rate, 3)} (error rate now {_pct(s.error_rate, 3)}).</p>")
    reasons = _table(["reason", "pairs"], [[_e(r), _n(n)] for r, n in s.errors_by_reason.items()], {1},
                     "errors-by-reason") if s.errors_by_reason else "<p>No pair failed to score.</p>"
    return (f'<section id="summary"><h2>Summary</h2><div class="cards">{"".join(cards)}</div>{gamma_line}{policy}'
            f"<h3>Errors by reason</h3>{reasons}</section>")


def _model(data: ReportData) -> str:
    m = data.model
    fp = m.fingerprint
    rows = [
        ["model", _e(m.description)],
        ["architecture", _e(fp.get("architecture"))],
        ["weights sha256", f"<code>{_e(fp.get('weights_sha256') or 'none (random weights)')}</code>"],
        ["precision", _e(fp.get("precision"))],
        ["preprocess", f"<code>{_e(json.dumps(fp.get('preprocess'), separators=(',', ':')))}</code>"],
        ["pretrained", _e(m.model.get("pretrained"))],
        ["scored by clipguard", _e(m.clipguard_version)],
        ["shards scored", f"{m.shards_done:,} of {m.shards_total:,}" + ("" if m.complete else " (incomplete)")],
    ]
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<section id="model"><h2>Reference model</h2><table id="model-table"><tbody>{body}</tbody></table></section>'


def _distances(data: ReportData) -> str:
    parts = ['<section id="distances"><h2>Distances and the threshold</h2>',
             _png(data.density_png, "density of cosine distances with gamma")]
    if data.calibration is not None:
        parts.append(_calibration(data.calibration))
    parts.append("</section>")
    return "".join(parts)


def _calibration(c: CalibrationSection) -> str:
    rows = [[_e(e.name), _f(e.point, 4), f"[{_f(e.lower, 4)}, {_f(e.upper, 4)}]"] for e in c.estimates]
    targets = ", ".join(f"{k} {v}" for k, v in c.targets.items() if v is not None) or "–"
    intro = (f"<p>Calibration <code>{_e(c.path)}</code>: gamma {_f(c.gamma)} by {_e(c.method)} ({_e(c.criterion)}; "
             f"target {_e(targets)}), from {_n(c.n_labelled)} labelled pairs of which {_n(c.n_positive_labels)} "
             f"poison; intervals at {_pct(c.confidence, 0)} confidence; ROC AUC {_f(c.roc_auc, 3)}.</p>")
    figure = ""
    if c.densities_png:
        figure = "<h3>Labelled pairs (the calibration's figure)</h3>" + _png(c.densities_png, "labelled densities")
    return (f"<h3>Estimates at gamma for the whole data</h3>{intro}"
            f"{_table(['estimate', 'point', 'interval'], rows, {1, 2}, 'calibration-estimates')}{figure}")


def _shards(data: ReportData) -> str:
    shards = data.shards
    shown = sorted(shards, key=lambda s: -(s.flagged_rate or 0))[:MAX_SHARD_TABLE_ROWS]
    note = f"<p>The {MAX_SHARD_TABLE_ROWS} shards with the highest flagged rate of {len(shards):,}.</p>" \
        if len(shards) > MAX_SHARD_TABLE_ROWS else ""
    rows = [[f"<code>{_e(s.shard)}</code>", _n(s.pairs), _n(s.ok), _n(s.errors), _n(s.flagged), _pct(s.flagged_rate, 3),
             _e("truncated" if s.truncated else "") + (f" {_e(s.read_error)}" if s.read_error else "")]
            for s in shown]
    table = _table(["shard", "pairs", "ok", "errors", "flagged", "flagged rate", "read problems"], rows,
                   {1, 2, 3, 4, 5}, "shards")
    return f'<section id="by-shard"><h2>By shard</h2>{_png(data.shard_png, "flagged rate by shard")}{note}{table}</section>'


def _signals(data: ReportData) -> str:
    return '<section id="signals"><h2>Signals</h2>' + "".join(_signal(t) for t in data.signals) + "</section>"


def _signal(t: SignalTable) -> str:
    title = f"{t.name}" + (" (the signal gamma applies to)" if t.primary else " (extra signal, no threshold)")
    stats = [["pairs with a value", _n(t.n)], ["missing", _n(t.missing)], ["mean", _f(t.mean)]]
    stats += [[q, _f(v)] for q, v in t.quantiles.items()] + [["max", _f(t.maximum)]]
    if t.flagged is not None:
        stats.append(["flagged (>= gamma)", _n(t.flagged)])
    top = _table(["shard", "key", t.name], [[f"<code>{_e(r.shard)}</code>", f"<code>{_e(r.key)}</code>", _f(r.value)]
                                            for r in t.top], {2})
    return (f'<div class="signal" id="signal-{_e(t.name)}"><h3>{_e(title)}</h3>'
            f'<div style="display:flex;gap:32px;flex-wrap:wrap">{_table(["statistic", "value"], stats, {1})}'
            f"<div><div class=\"meta\">highest values</div>{top}</div></div></div>")


def _pair_card(p: PairView) -> str:
    t = p.thumbnail
    if t.data_uri:
        picture = f'<img alt="image of {_e(p.key)}" src="{t.data_uri}">'
    else:
        picture = f'<div class="placeholder">no picture: {_e(t.problem)}</div>'
    caption = t.caption if t.caption is not None else "(caption not available)"
    if len(caption) > CAPTION_CHARS:
        caption = caption[:CAPTION_CHARS] + "…"
    label = f" · class {_e(p.label)}" if p.label else ""
    problem = f'<div class="reason">read: {_e(t.problem)}</div>' if t.data_uri and t.problem else ""
    return (f'<div class="pair{" flagged" if p.flagged else ""}">{picture}<div class="caption">{_e(caption)}</div>'
            f'<div class="reason{" flag" if p.flagged else ""}">{_e(p.reason)}</div>'
            f'<div class="reason mono">{_e(p.shard)} / {_e(p.key)}{label}</div>{problem}</div>')


def _worst(data: ReportData) -> str:
    if not data.worst:
        return '<section id="worst"><h2>Worst pairs</h2><p>No pair could be scored.</p></section>'
    cards = "".join(_pair_card(p) for p in data.worst)
    unreadable = ""
    if data.unreadable_shards:
        rows = [[f"<code>{_e(s)}</code>", _e(r)] for s, r in data.unreadable_shards.items()]
        unreadable = "<h3>Shards that could not be read back</h3>" + _table(["shard", "reason"], rows)
    return (f'<section id="worst"><h2>The {len(data.worst)} pairs with the highest distance</h2>'
            f'<div class="pairs">{cards}</div>{unreadable}</section>')


def _errors(data: ReportData) -> str:
    if not data.errors:
        return ""
    more = data.summary.errors - len(data.errors)
    rows = [[f"<code>{_e(e.shard)}</code>", f"<code>{_e(e.key)}</code>", _e(e.error)] for e in data.errors]
    tail = f"<p>… and {more:,} more (see the score files).</p>" if more > 0 else ""
    return (f'<section id="errors"><h2>Pairs that could not be scored</h2>'
            f'{_table(["shard", "key", "reason"], rows, table_id="error-rows")}{tail}</section>')


def _findings(data: ReportData) -> str:
    findings = data.findings or []
    intro = f"<p>From <code>{_e(data.findings_path)}</code>: {len(findings)} finding(s).</p>"
    if not findings:
        return f'<section id="audit"><h2>Audit findings</h2>{intro}<p>The audit found nothing.</p></section>'
    summary = _table(["finding", "p-value", "pairs", "scored", "flagged", "not in scores"],
                     [[_e(f.finding.name), _p(f.finding.p_value), _n(len(f.finding.pairs)), _n(f.scored),
                       _n(f.flagged), _n(f.unknown)] for f in findings], {1, 2, 3, 4, 5}, "findings")
    return f'<section id="audit"><h2>Audit findings</h2>{intro}{summary}{"".join(_finding(f) for f in findings)}</section>'


def _p(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def _finding(f: FindingView) -> str:
    shown = f"<p class=\"meta\">showing {len(f.shown)} of {len(f.finding.pairs):,} pairs</p>" if f.shown else ""
    cards = f'<div class="pairs">{"".join(_pair_card(p) for p in f.shown)}</div>' if f.shown else ""
    return (f'<div class="finding"><h3>{_e(f.finding.name)} · p = {_p(f.finding.p_value)}</h3>'
            f"<p>{_e(f.finding.description)}</p>{shown}{cards}</div>")


def _classes(c: ClassTable) -> str:
    rows = [[_e(r.name), _n(r.pairs), _n(r.ok), _n(r.flagged), _pct(r.flagged_rate, 2), _f(r.median_distance)]
            for r in c.rows]
    table = _table(["class", "pairs", "scored", "flagged", "flagged rate", "median distance"], rows,
                   {1, 2, 3, 4, 5}, "classes")
    unlabelled = _table(["no class because", "pairs"], [[_e(k), _n(v)] for k, v in c.unlabelled.items()], {1}) \
        if c.unlabelled else ""
    return (f'<section id="classes"><h2>By class of the caption</h2><p>The class a caption names, by whole-word '
            f"keyword search with <code>{_e(c.keywords)}</code>; a caption naming two classes, or none, gets no "
            "class. A class whose captions are flagged far more often than the rest is what a targeted attack "
            f"on that class looks like.</p>{table}{unlabelled}</section>")


def _filter(f: FilterSection) -> str:
    t = f.totals
    head = (f"<p>From <code>{_e(f.path)}</code>{'' if f.complete else ' (incomplete run)'}: gamma {_f(f.gamma)} "
            f"({_e(f.gamma_source)}); {f.clean_parts:,} clean part(s), {f.quarantine_parts:,} quarantine part(s)"
            f"{'' if f.same_model else '; scored by a different model than this report'}.</p>")
    totals = _table(["read", "kept", "flagged", "errored", "quarantined"],
                    [[_n(t.get(k)) for k in ("read", "kept", "flagged", "errored", "quarantined")]],
                    {0, 1, 2, 3, 4}, "filter-totals")
    inputs = _table(["input shard", "read", "kept", "flagged", "errored"],
                    [[f"<code>{_e(i.get('shard'))}</code>", *(_n(i.get(k)) for k in ("read", "kept", "flagged", "errored"))]
                     for i in f.inputs[:MAX_SHARD_TABLE_ROWS]], {1, 2, 3, 4})
    reasons = _table(["error reason", "pairs"], [[_e(k), _n(v)] for k, v in f.errors_by_reason.items()], {1}) \
        if f.errors_by_reason else ""
    return f'<section id="filter"><h2>Filter results</h2>{head}{totals}{reasons}{inputs}</section>'


def _footer() -> str:
    return ("<footer>Cosine distance = 1 − cosine similarity of the image and caption embeddings under the "
            "reference model; poisoned pairs (a caption paired with an image of another class) sit at high "
            "distance. A pair filter cannot see poisons whose caption matches the image (clean-label, "
            "split-view, natural triggers). Self-contained page: nothing is loaded from the network.</footer>")
