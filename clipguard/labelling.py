"""What a person labels: the sample CSV, and label files read back (the page is in labelpage.py).

The sample CSV has the columns ``key, shard, caption, distance, inclusion_probability, weight,
stratum, label``; the ``label`` column starts empty. Accepted label values, case-insensitive:

    poison  1  yes  true    the caption does not describe the image (a suspected poison)
    clean   0  no   false   the pair is fine
    (empty)                 not labelled yet; counted, never guessed

Only ``key`` and ``label`` are required when a label file is read back (``shard`` where keys
repeat across shards); other columns may be edited or deleted freely. The inclusion
probabilities come from ``sample_design.json``, never from the CSV's columns, so a spreadsheet
cannot change the weights by accident.

The labels.csv that the page downloads starts with one comment line that carries the whole
``sample_design.json``::

    # clipguard-sample-design/1 <base64 of the design JSON>
    key,shard,label
    ...

so that the file is usable wherever the browser saved it; `calibrate` checks that design against
the score folder exactly as it checks a design file.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipguard.errors import CalibrationError, NoLabelledSampleError

if TYPE_CHECKING:
    from clipguard.labelpage import PageImages

SAMPLE_COLUMNS = ("key", "shard", "caption", "distance", "inclusion_probability", "weight", "stratum", "label", "uid", "url")
POISON_VALUES = ("poison", "1", "yes", "true")
CLEAN_VALUES = ("clean", "0", "no", "false")
LABEL_HELP = "poison / clean (also 1 / 0, yes / no, true / false); leave empty if unsure"
MAX_LABEL_FILE_BYTES = 256 << 20
DESIGN_LINE_PREFIX = "# clipguard-sample-design/1 "


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
    images: "PageImages | None" = None  # thumbnail and zoom image for the page
    unavailable: str | None = None  # why the image or caption could not be read back
    uid: str | None = None  # from the sample's metadata (img2dataset / DataComp), to join back to the source
    url: str | None = None

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
    embedded_design: dict[str, Any] | None = None  # the design JSON of a page download, not yet checked

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
                row.stratum, "", row.uid or "", row.url or "",
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
    embedded_design, text, first_line = _split_design_line(path, text)
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
    for line, record in enumerate(reader, start=first_line + 1):
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
    return LabelFile(path=path, entries=tuple(entries), unlabelled_rows=unlabelled, embedded_design=embedded_design)


def design_comment_line(payload: dict[str, Any]) -> str:
    """The first line of a page download: the sample design, base64 so it holds no comma or quote."""
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return DESIGN_LINE_PREFIX + base64.b64encode(data).decode("ascii")


def _split_design_line(path: Path, text: str) -> tuple[dict[str, Any] | None, str, int]:
    """(embedded design or None, the CSV after it, 1-based line number of the CSV header)."""
    first, newline, rest = text.partition("\n")
    # A spreadsheet that saved the file may have quoted the cell or padded the row with commas.
    cells = next(csv.reader([first.rstrip("\r")]), [""])
    head = cells[0].strip() if cells else ""
    if not head.startswith(DESIGN_LINE_PREFIX.strip()):
        return None, text, 1
    if any(cell.strip() for cell in cells[1:]):
        raise LabelFileError(f"the sample design line of {path} has extra cells; download labels.csv from the page again")
    encoded = head[len(DESIGN_LINE_PREFIX.strip()):].strip()
    try:
        payload = json.loads(base64.b64decode(encoded, validate=True).decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LabelFileError(
            f"the sample design line of {path} is damaged ({exc}); download labels.csv from the page again "
            "or pass --design sample_design.json"
        ) from None
    if not isinstance(payload, dict):
        raise LabelFileError(f"the sample design line of {path} does not hold a design object")
    return payload, rest, 2


def _refuse_duplicates(path: Path, entries: list[LabelEntry]) -> None:
    seen: dict[tuple[str | None, str], int] = {}
    for entry in entries:
        ident = (entry.shard, entry.key)
        if ident in seen:
            raise LabelFileError(
                f"{path} labels key {entry.key!r} twice (lines {seen[ident]} and {entry.line}); keep one label per pair"
            )
        seen[ident] = entry.line
