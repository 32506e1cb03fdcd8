"""What a person labels: the sample CSV, the HTML page to label from, and label files read back.

The sample CSV has the columns ``key, shard, caption, distance, inclusion_probability, weight,
stratum, label``; the ``label`` column starts empty. Accepted label values, case-insensitive:

    poison  1  yes  true    the caption does not describe the image (a suspected poison)
    clean   0  no   false   the pair is fine
    (empty)                 not labelled yet; counted, never guessed

Only ``key`` and ``label`` are required when a label file is read back (``shard`` where keys
repeat across shards); other columns may be edited or deleted freely. The inclusion
probabilities come from ``sample_design.json``, never from the CSV, so a spreadsheet cannot
change the weights by accident.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from clipguard.data.pairs import DecodeLimits, open_image
from clipguard.errors import CalibrationError, NoLabelledSampleError

SAMPLE_COLUMNS = ("key", "shard", "caption", "distance", "inclusion_probability", "weight", "stratum", "label")
POISON_VALUES = ("poison", "1", "yes", "true")
CLEAN_VALUES = ("clean", "0", "no", "false")
LABEL_HELP = "poison / clean (also 1 / 0, yes / no, true / false); leave empty if unsure"
THUMBNAIL_SIDE = 128
THUMBNAIL_QUALITY = 80
MAX_LABEL_FILE_BYTES = 256 << 20


class LabelFileError(CalibrationError):
    """A label file that cannot be read as labels."""


@dataclass(frozen=True)
class SampleRow:
    """One pair of a drawn sample, as written to sample.csv and shown on the page."""

    key: str
    shard: str
    caption: str | None
    distance: float
    inclusion_probability: float
    stratum: int
    thumbnail: str | None = None  # data: URI of a JPEG of at most THUMBNAIL_SIDE pixels
    unavailable: str | None = None  # why the image or caption could not be read back

    @property
    def weight(self) -> float:
        """How many pairs of the full data this one stands for (1 / inclusion probability)."""
        return 1.0 / self.inclusion_probability


@dataclass(frozen=True)
class LabelEntry:
    """One labelled row of a label file; ``line`` is the 1-based line in the file (header = 1)."""

    line: int
    key: str
    shard: str | None
    poison: bool


@dataclass(frozen=True)
class LabelFile:
    path: Path
    entries: tuple[LabelEntry, ...]
    unlabelled_rows: int

    @property
    def n_poison(self) -> int:
        return sum(e.poison for e in self.entries)


def parse_label(value: str) -> bool | None:
    """True = poison, False = clean, None = not labelled; ValueError for anything else."""
    text = value.strip().lower()
    if text == "":
        return None
    if text in POISON_VALUES:
        return True
    if text in CLEAN_VALUES:
        return False
    raise ValueError(text)


def write_sample_csv(path: Path, rows: list[SampleRow]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(SAMPLE_COLUMNS)
        for row in rows:
            writer.writerow([
                row.key, row.shard, row.caption if row.caption is not None else "",
                f"{row.distance:.6f}", f"{row.inclusion_probability:.6g}", f"{row.weight:.6g}",
                row.stratum, "",
            ])


def read_label_file(path: Path) -> LabelFile:
    """Read a CSV with at least ``key`` and ``label`` columns (e.g. a filled-in sample.csv)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise LabelFileError(f"cannot read label file {path}: {exc.strerror or exc}") from None
    if size > MAX_LABEL_FILE_BYTES:
        raise LabelFileError(f"label file {path} is larger than {MAX_LABEL_FILE_BYTES >> 20} MiB")
    try:
        # utf-8-sig: spreadsheets often save CSV with a byte-order mark.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LabelFileError(f"label file {path} is not UTF-8 text: {exc}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [c.strip().lower() for c in (reader.fieldnames or [])]
    missing = [c for c in ("key", "label") if c not in columns]
    if missing:
        raise LabelFileError(
            f"label file {path} has no {' or '.join(repr(c) for c in missing)} column (columns: "
            f"{', '.join(columns) or 'none'}); use the sample.csv written by `clipguard sample`"
        )
    reader.fieldnames = columns
    entries: list[LabelEntry] = []
    bad: list[tuple[int, str]] = []
    unlabelled = 0
    for line, record in enumerate(reader, start=2):
        try:
            poison = parse_label(record.get("label") or "")
        except ValueError as exc:
            bad.append((line, str(exc)))
            continue
        if poison is None:
            unlabelled += 1
            continue
        shard = (record.get("shard") or "").strip() or None
        entries.append(LabelEntry(line, (record.get("key") or "").strip(), shard, poison))
    if bad:
        shown = ", ".join(f"line {line}: {value!r}" for line, value in bad[:5])
        raise LabelFileError(
            f"{len(bad)} label(s) in {path} are not understood ({shown}{', ...' if len(bad) > 5 else ''}); "
            f"use {LABEL_HELP}"
        )
    if not entries:
        raise NoLabelledSampleError(
            f"{path} has {unlabelled} row(s) but no label: fill the label column with {LABEL_HELP}"
        )
    _refuse_duplicates(path, entries)
    return LabelFile(path=path, entries=tuple(entries), unlabelled_rows=unlabelled)


def _refuse_duplicates(path: Path, entries: list[LabelEntry]) -> None:
    seen: dict[tuple[str | None, str], int] = {}
    for entry in entries:
        ident = (entry.shard, entry.key)
        if ident in seen:
            raise LabelFileError(
                f"{path} labels key {entry.key!r} twice (lines {seen[ident]} and {entry.line}); keep one label per pair"
            )
        seen[ident] = entry.line


def thumbnail_data_uri(image_bytes: bytes, limits: DecodeLimits) -> tuple[str | None, str | None]:
    """(data: URI of a JPEG thumbnail, None) or (None, why the image could not be shown)."""
    image, error = open_image(image_bytes, DecodeLimits(limits.max_pixels, limits.max_caption_bytes, THUMBNAIL_SIDE))
    if image is None:
        return None, error
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), None


_PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; margin-bottom: 0.2em; }
.help { max-width: 60em; line-height: 1.4; }
table { border-collapse: collapse; margin-top: 1em; }
th, td { border-bottom: 1px solid #ddd; padding: 6px 10px; vertical-align: middle; text-align: left; }
th { background: #f4f4f4; position: sticky; top: 0; }
td.num { font-variant-numeric: tabular-nums; text-align: right; white-space: nowrap; }
td.caption { max-width: 34em; }
td.key { font-family: monospace; font-size: 0.85em; color: #555; }
img.thumb { display: block; max-width: 128px; max-height: 128px; }
.noimg { width: 128px; color: #a00; font-size: 0.85em; }
tr.poison { background: #fde8e8; }
tr.clean { background: #e8f6ea; }
label { margin-right: 0.8em; white-space: nowrap; cursor: pointer; }
button { font-size: 1em; padding: 0.4em 1em; }
"""

# Downloads the page's choices as a CSV that `clipguard calibrate --labels` reads; data: URLs
# keep the page self-contained (no server, no external script).
_PAGE_SCRIPT = """
function csvCell(v) { return /[",\\n\\r]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v; }
function mark(input) {
  var row = input.closest('tr'); row.classList.remove('poison', 'clean'); row.classList.add(input.value);
  count();
}
function count() {
  var n = document.querySelectorAll('input.lab:checked').length;
  document.getElementById('done').textContent = n;
}
function download() {
  var lines = ['key,shard,label'];
  document.querySelectorAll('tbody tr').forEach(function (row) {
    var picked = row.querySelector('input.lab:checked');
    lines.push([row.dataset.key, row.dataset.shard, picked ? picked.value : ''].map(csvCell).join(','));
  });
  var link = document.createElement('a');
  link.href = 'data:text/csv;charset=utf-8,' + encodeURIComponent(lines.join('\\n') + '\\n');
  link.download = 'labels.csv';
  document.body.appendChild(link); link.click(); link.remove();
}
"""


def render_sample_page(rows: list[SampleRow], title: str, notes: list[str]) -> str:
    """A self-contained HTML page: one row per pair with its thumbnail, caption and distance."""
    escape = html.escape
    body_rows = []
    for number, row in enumerate(rows, start=1):
        if row.thumbnail is not None:
            image = f'<img class="thumb" src="{row.thumbnail}" alt="image of pair {number}">'
        else:
            image = f'<div class="noimg">image unavailable: {escape(row.unavailable or "unknown reason")}</div>'
        caption = escape(row.caption) if row.caption is not None else "<em>caption unavailable</em>"
        name = f"l{number}"
        body_rows.append(
            f'<tr data-key="{escape(row.key)}" data-shard="{escape(row.shard)}">'
            f'<td class="num">{number}</td><td>{image}</td><td class="caption">{caption}</td>'
            f'<td class="num">{row.distance:.4f}</td><td class="num">{row.stratum}</td>'
            f'<td class="num">{row.weight:.4g}</td>'
            f'<td><label><input class="lab" type="radio" name="{name}" value="poison" onchange="mark(this)"> poison</label>'
            f'<label><input class="lab" type="radio" name="{name}" value="clean" onchange="mark(this)"> clean</label></td>'
            f'<td class="key">{escape(row.shard)}<br>{escape(row.key)}</td></tr>'
        )
    notes_html = "".join(f"<p>{escape(note)}</p>" for note in notes)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{escape(title)}</title><style>{_PAGE_STYLE}</style><script>{_PAGE_SCRIPT}</script></head>\n<body>"
        f"<h1>{escape(title)}</h1><div class=\"help\">"
        "<p>Label each pair <b>poison</b> if the caption does not describe the image, <b>clean</b> if it does. "
        "Then either press <b>Download labels.csv</b> (your choices on this page) or fill the <code>label</code> "
        f"column of <code>sample.csv</code> ({escape(LABEL_HELP)}), and run "
        "<code>clipguard calibrate SCORES --labels FILE</code>. Rows left empty are counted as unlabelled, never guessed.</p>"
        f"{notes_html}<p><button type=\"button\" onclick=\"download()\">Download labels.csv</button> "
        f"<span id=\"done\">0</span> of {len(rows)} labelled</p></div>\n"
        "<table><thead><tr><th>#</th><th>image</th><th>caption</th><th>cosine distance</th><th>stratum</th>"
        "<th>weight</th><th>label</th><th>shard / key</th></tr></thead>\n<tbody>\n"
        + "\n".join(body_rows)
        + "\n</tbody></table></body></html>\n"
    )
