"""The self-contained HTML page a person labels a sample from (``index.html`` of `clipguard sample`).

A person labels 300 to 500 pairs here, so the page is built for speed and for not losing work:

- keys: j / k next / previous pair, p / c poison / clean (then the next pair), u clears, z zooms;
  the same actions are buttons;
- every change is saved in the browser's localStorage under a key unique to this sample (its
  ``sample_id``), and restored when the page is opened again;
- blind by default: no distance, stratum or weight is shown, and the rows are in a shuffled order
  recorded in sample_design.json, so the scorer's opinion cannot steer the labeller;
- thumbnails of up to THUMBNAIL_SIDE pixels, and the full image in a zoom view (small images are
  scaled up by whole pixels, so a trigger patch stays sharp);
- "Download labels.csv" writes ``key, shard, label`` preceded by one comment line that carries
  the sample design, so `clipguard calibrate SCORES --labels labels.csv` works wherever the
  browser saved it.

No network, no external script: images are data: URIs and the script is inline.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass

from PIL import Image

from clipguard.data.pairs import WEB_IMAGE_FORMATS, DecodeLimits, open_image
from clipguard.labelling import LABEL_HELP, SampleRow

THUMBNAIL_SIDE = 256
THUMBNAIL_QUALITY = 85
ZOOM_QUALITY = 92
# The zoom view embeds the image as stored where a browser can show that format; past this size
# it is re-encoded (and, only if still too large, halved) so that 500 pairs stay a loadable page.
MAX_ZOOM_BYTES = 8 << 20
BROWSER_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}
STORAGE_PREFIX = "clipguard-labels/"


@dataclass(frozen=True)
class PageImages:
    """What the page shows of one pair's image; ``error`` says why there is none."""

    thumbnail: str | None = None  # data: URI, a JPEG of at most THUMBNAIL_SIDE a side, or the small image itself
    full: str | None = None  # data: URI of the full image (None when the thumbnail is the full image)
    width: int = 0
    height: int = 0
    zoom_note: str | None = None  # set when the zoom view is not the image as stored
    error: str | None = None


@dataclass(frozen=True)
class PageSpec:
    """Everything about a page that is not a row: what to call it, how to save, what to download."""

    title: str
    notes: tuple[str, ...]
    sample_id: str  # localStorage key suffix: unique to one drawn sample
    design_line: str  # first line of the downloaded CSV (labelling.design_comment_line)
    calibrate_command: str  # shown to the labeller, e.g. "clipguard calibrate /data/scores --labels labels.csv"
    order: tuple[int, ...]  # display position -> row index (a permutation)
    show_scores: bool = False


def page_images(image_bytes: bytes, limits: DecodeLimits) -> PageImages:
    """Thumbnail and zoom image of one pair, within the same pixel limits as scoring."""
    # Full decode (no JPEG draft): the zoom view and its stated size are the image as stored.
    image, error = open_image(image_bytes, DecodeLimits(limits.max_pixels, limits.max_caption_bytes, None))
    if image is None:
        return PageImages(error=error)
    width, height = image.size
    full, note = _zoom_image(image_bytes, image)
    if max(width, height) <= THUMBNAIL_SIDE and note is None:
        # Small enough to be its own thumbnail: the page embeds the stored bytes once.
        return PageImages(thumbnail=full, full=None, width=width, height=height)
    thumbnail = image.copy()
    thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    thumb_uri = _data_uri(_encode(thumbnail, "JPEG", THUMBNAIL_QUALITY), "image/jpeg")
    return PageImages(thumbnail=thumb_uri, full=full, width=width, height=height, zoom_note=note)


def _zoom_image(image_bytes: bytes, image: Image.Image) -> tuple[str, str | None]:
    """The image as stored when a browser can show it, else re-encoded; never silently smaller."""
    stored_format = Image.open(io.BytesIO(image_bytes), formats=WEB_IMAGE_FORMATS).format
    if stored_format in BROWSER_FORMATS and len(image_bytes) <= MAX_ZOOM_BYTES:
        return _data_uri(image_bytes, BROWSER_FORMATS[stored_format]), None
    # PNG keeps every pixel of formats a browser cannot show (TIFF, BMP, ...) when it fits.
    encoded, mime = _encode(image, "PNG"), "image/png"
    if len(encoded) > MAX_ZOOM_BYTES:
        encoded, mime = _encode(image, "JPEG", ZOOM_QUALITY), "image/jpeg"
    shown = image
    while len(encoded) > MAX_ZOOM_BYTES:
        shown = shown.resize((max(1, shown.width // 2), max(1, shown.height // 2)), Image.Resampling.LANCZOS)
        encoded = _encode(shown, "JPEG", ZOOM_QUALITY)
    if shown is image:
        return _data_uri(encoded, mime), f"re-encoded as {mime.split('/')[1].upper()} from {stored_format}"
    return _data_uri(encoded, mime), f"reduced to {shown.width}x{shown.height} to stay under {MAX_ZOOM_BYTES / 2**20:.2g} MiB"


def _encode(image: Image.Image, fmt: str, quality: int | None = None) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": quality} if quality is not None else {}))
    return buffer.getvalue()


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _script_json(value) -> str:
    """JSON that is safe inside a <script> element: no '<', '>' or '&' can close or open a tag."""
    text = json.dumps(value, ensure_ascii=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 1.5em 1.5em; color: #222; }
h1 { font-size: 1.3em; margin: 0.8em 0 0.2em; }
.help { max-width: 64em; line-height: 1.4; }
#bar { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid #ccc;
       padding: 0.5em 0; display: flex; gap: 1.2em; align-items: center; flex-wrap: wrap; }
#progress { font-weight: bold; font-variant-numeric: tabular-nums; }
#saved { color: #555; font-size: 0.9em; }
#saved.broken { color: #a00; font-weight: bold; }
kbd { border: 1px solid #aaa; border-bottom-width: 2px; border-radius: 3px; padding: 0 0.3em;
      font-family: monospace; background: #f7f7f7; color: #222; }
.legend span { margin-right: 0.9em; white-space: nowrap; }
table { border-collapse: collapse; margin-top: 0.5em; }
th, td { border-bottom: 1px solid #ddd; padding: 6px 10px; vertical-align: middle; text-align: left; }
th { background: #f4f4f4; }
td.num { font-variant-numeric: tabular-nums; text-align: right; white-space: nowrap; }
td.caption { max-width: 34em; font-size: 1.05em; }
td.key { font-family: monospace; font-size: 0.8em; color: #666; }
img.thumb { display: block; width: 256px; height: 256px; object-fit: contain; background: #eee; cursor: zoom-in; }
img.thumb.small { image-rendering: pixelated; }
.noimg { width: 256px; color: #a00; font-size: 0.85em; }
tr.pair { scroll-margin-top: 5em; }
tr.current { outline: 3px solid #2a6fdb; outline-offset: -3px; }
tr.poison { background: #fde8e8; }
tr.clean { background: #e8f6ea; }
td.actions button { display: block; width: 7.5em; margin: 0.25em 0; font-size: 0.95em; padding: 0.3em 0.5em; }
tr.poison button[data-value=poison] { background: #d33; color: #fff; }
tr.clean button[data-value=clean] { background: #2a2; color: #fff; }
button { font-size: 1em; padding: 0.4em 1em; cursor: pointer; }
#zoom { position: fixed; inset: 0; z-index: 5; background: rgba(0, 0, 0, 0.96); color: #eee;
        overflow: auto; display: none; text-align: center; }
#zoom.open { display: block; }
#zoom img { display: block; margin: 1em auto 0.5em; image-orientation: none; }
#zoom .pixelated { image-rendering: pixelated; }
#zoom p { margin: 0.3em auto; max-width: 60em; }
#zoom-label.poison { color: #f88; } #zoom-label.clean { color: #8f8; }
"""

# Labels are kept in memory by pair (shard, key), so a restored save does not depend on the row
# order, and written to localStorage after every change. The download lists the rows in the
# order of sample.csv, after the design line, whatever the display order.
_PAGE_SCRIPT = r"""
document.addEventListener('DOMContentLoaded', function () {
  var config = JSON.parse(document.getElementById('clipguard-page').textContent);
  var storeKey = config.storagePrefix + config.sampleId;
  var rows = Array.prototype.slice.call(document.querySelectorAll('tbody tr.pair'));
  var labels = {};
  var current = 0;
  var storageOk = true;
  var zoom = document.getElementById('zoom'), zoomImg = document.getElementById('zoom-img');

  function ident(row) { return JSON.stringify([row.dataset.shard, row.dataset.key]); }
  function save() {
    try {
      localStorage.setItem(storeKey, JSON.stringify({format: 'clipguard-page-labels/1', labels: labels,
                                                     current: current, saved: new Date().toISOString()}));
      document.getElementById('saved').textContent = 'saved in this browser';
    } catch (e) {
      storageOk = false;
      var note = document.getElementById('saved');
      note.textContent = 'NOT SAVED (' + e.name + '): download labels.csv before closing this page';
      note.classList.add('broken');
    }
  }
  function restore(withCursor) {
    var saved = null;
    try { saved = JSON.parse(localStorage.getItem(storeKey) || 'null'); } catch (e) { saved = null; }
    if (!saved || typeof saved.labels !== 'object' || saved.labels === null) return;
    rows.forEach(function (row) {
      var value = saved.labels[ident(row)];
      if (value === 'poison' || value === 'clean') labels[ident(row)] = value;
    });
    if (withCursor && typeof saved.current === 'number' && saved.current >= 0 && saved.current < rows.length) current = saved.current;
  }
  function paint(row) {
    var value = labels[ident(row)] || '';
    row.classList.remove('poison', 'clean');
    if (value) row.classList.add(value);
    row.querySelectorAll('button.lab').forEach(function (b) {
      b.setAttribute('aria-pressed', b.dataset.value && b.dataset.value === value ? 'true' : 'false');
    });
  }
  function progress() {
    var n = 0, poison = 0;
    rows.forEach(function (row) { var v = labels[ident(row)]; if (v) { n++; if (v === 'poison') poison++; } });
    document.getElementById('done').textContent = n;
    document.getElementById('poisons').textContent = poison;
    document.getElementById('cleans').textContent = n - poison;
  }
  function select(i, scroll) {
    if (!rows.length) return;
    current = Math.max(0, Math.min(rows.length - 1, i));
    rows.forEach(function (row, j) { row.classList.toggle('current', j === current); });
    if (scroll) rows[current].scrollIntoView({block: 'nearest'});
    if (zoom.classList.contains('open')) showZoom();
  }
  function setLabel(i, value) {
    var row = rows[i];
    if (value) labels[ident(row)] = value; else delete labels[ident(row)];
    paint(row); progress(); save();
    if (zoom.classList.contains('open')) showZoom();
  }
  function showZoom() {
    var row = rows[current], thumb = row.querySelector('img.thumb');
    zoom.classList.add('open');
    document.getElementById('zoom-number').textContent = row.dataset.number;
    document.getElementById('zoom-caption').textContent = row.querySelector('td.caption').textContent;
    var value = labels[ident(row)] || 'not labelled';
    var label = document.getElementById('zoom-label');
    label.textContent = value; label.className = value;
    if (!thumb) { zoomImg.removeAttribute('src'); zoomImg.style.display = 'none';
                  document.getElementById('zoom-size').textContent = 'image unavailable'; return; }
    var w = Number(thumb.dataset.width), h = Number(thumb.dataset.height);
    // Whole-pixel scaling: a small image fills the screen without blurring a trigger patch.
    var scale = Math.max(1, Math.floor(Math.min(window.innerWidth * 0.9 / w, window.innerHeight * 0.8 / h)));
    zoomImg.style.display = 'block';
    zoomImg.src = thumb.dataset.full || thumb.src;
    zoomImg.style.width = (w * scale) + 'px'; zoomImg.style.height = (h * scale) + 'px';
    zoomImg.classList.toggle('pixelated', scale > 1);
    document.getElementById('zoom-size').textContent = w + ' x ' + h + ' px' + (scale > 1 ? ', shown at ' + scale + 'x' : '')
      + (thumb.dataset.note ? ' (' + thumb.dataset.note + ')' : '');
  }
  function closeZoom() { zoom.classList.remove('open'); }
  function csvCell(v) { return /[",\n\r]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v; }
  function download() {
    var ordered = rows.slice().sort(function (a, b) { return Number(a.dataset.index) - Number(b.dataset.index); });
    var lines = [config.designLine, 'key,shard,label'];
    ordered.forEach(function (row) {
      lines.push([row.dataset.key, row.dataset.shard, labels[ident(row)] || ''].map(csvCell).join(','));
    });
    var blob = new Blob([lines.join('\n') + '\n'], {type: 'text/csv;charset=utf-8'});
    var link = document.createElement('a');
    link.href = URL.createObjectURL(blob);
    link.download = 'labels.csv';
    document.body.appendChild(link); link.click(); link.remove();
    setTimeout(function () { URL.revokeObjectURL(link.href); }, 10000);
  }

  document.querySelector('tbody').addEventListener('click', function (event) {
    var row = event.target.closest('tr.pair');
    if (!row) return;
    var i = rows.indexOf(row);
    select(i, false);
    var button = event.target.closest('button.lab');
    if (button) setLabel(i, button.dataset.value);
    else if (event.target.closest('img.thumb')) showZoom();
  });
  zoom.addEventListener('click', function (event) { if (event.target === zoom) closeZoom(); });
  document.getElementById('zoom-close').addEventListener('click', closeZoom);
  document.getElementById('download').addEventListener('click', download);
  document.addEventListener('keydown', function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    var tag = event.target && event.target.tagName;
    if (tag === 'INPUT' || tag === 'TEXTAREA' || tag === 'SELECT') return;
    var key = event.key.toLowerCase(), handled = true;
    if (key === 'j' || key === 'arrowdown') select(current + 1, true);
    else if (key === 'k' || key === 'arrowup') select(current - 1, true);
    else if (key === 'p') { setLabel(current, 'poison'); select(current + 1, true); }
    else if (key === 'c') { setLabel(current, 'clean'); select(current + 1, true); }
    else if (key === 'u') setLabel(current, '');
    else if (key === 'z') { if (zoom.classList.contains('open')) closeZoom(); else showZoom(); }
    else if (key === 'escape') closeZoom();
    else handled = false;
    if (handled) { event.preventDefault(); save(); }
  });

  // Another tab of this page saved: take its labels, so that neither tab overwrites the other's work.
  window.addEventListener('storage', function (event) {
    if (event.key !== storeKey) return;
    labels = {};
    restore(false);  // this tab keeps its own place
    rows.forEach(paint); progress(); select(current, false);
  });

  restore(true);
  rows.forEach(paint);
  progress();
  select(current, true);
  if (storageOk) save();
});
"""


def render_sample_page(rows: list[SampleRow], spec: PageSpec) -> str:
    """The labelling page: one row per pair, in ``spec.order``; scores only with ``show_scores``."""
    if sorted(spec.order) != list(range(len(rows))):
        raise ValueError("page order must be a permutation of the rows")
    escape = html.escape
    score_heads = "<th>cosine distance</th><th>stratum</th><th>weight</th>" if spec.show_scores else ""
    body_rows = [_render_row(number, index, rows[index], spec.show_scores)
                 for number, index in enumerate(spec.order, start=1)]
    config = {"sampleId": spec.sample_id, "storagePrefix": STORAGE_PREFIX, "designLine": spec.design_line}
    notes_html = "".join(f"<p>{escape(note)}</p>" for note in spec.notes)
    blind = (
        "" if spec.show_scores else
        "<p>The page is <b>blind</b>: the distances and strata are hidden and the pairs are in a shuffled "
        "order (recorded in sample_design.json), so that the scorer cannot steer your judgement.</p>"
    )
    legend = (
        '<span class="legend"><span><kbd>j</kbd> / <kbd>k</kbd> next / previous</span>'
        "<span><kbd>p</kbd> poison</span><span><kbd>c</kbd> clean</span>"
        "<span><kbd>u</kbd> clear</span><span><kbd>z</kbd> zoom</span></span>"
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{escape(spec.title)}</title><style>{_PAGE_STYLE}</style>"
        f"<script type=\"application/json\" id=\"clipguard-page\">{_script_json(config)}</script>"
        f"<script>{_PAGE_SCRIPT}</script></head>\n<body>"
        f"<h1>{escape(spec.title)}</h1><div class=\"help\">"
        "<p>Label each pair <b>poison</b> if the caption does not describe the image, <b>clean</b> if it does; "
        "leave it empty if unsure (counted as unlabelled, never guessed). <kbd>p</kbd> and <kbd>c</kbd> move on "
        "to the next pair. Your labels are saved in this browser as you go and come back when you reopen this "
        "page. When done, press <b>Download labels.csv</b> and run "
        f"<code>{escape(spec.calibrate_command)}</code>: the file carries its sample design, so it works "
        f"from any folder. Or fill the <code>label</code> column of <code>sample.csv</code> ({escape(LABEL_HELP)}).</p>"
        f"{blind}{notes_html}</div>\n"
        "<div id=\"bar\"><button type=\"button\" id=\"download\">Download labels.csv</button>"
        f"<span id=\"progress\"><span id=\"done\">0</span> of {len(rows)} labelled "
        "(<span id=\"poisons\">0</span> poison, <span id=\"cleans\">0</span> clean)</span>"
        f"{legend}<span id=\"saved\"></span></div>\n"
        "<table><thead><tr><th>#</th><th>image</th><th>caption</th>"
        f"{score_heads}<th>label</th><th>shard / key</th></tr></thead>\n<tbody>\n"
        + "\n".join(body_rows)
        + "\n</tbody></table>\n"
        "<div id=\"zoom\" role=\"dialog\" aria-label=\"zoomed image\"><p>pair <span id=\"zoom-number\"></span>: "
        "<b id=\"zoom-label\"></b> &middot; <span id=\"zoom-size\"></span> &middot; "
        "<kbd>z</kbd> or <kbd>Esc</kbd> closes, <kbd>j</kbd> / <kbd>k</kbd> / <kbd>p</kbd> / <kbd>c</kbd> / "
        "<kbd>u</kbd> work here too <button type=\"button\" id=\"zoom-close\">close</button></p>"
        "<img id=\"zoom-img\" alt=\"full image\"><p id=\"zoom-caption\"></p></div>"
        "</body></html>\n"
    )


def _render_row(number: int, index: int, row: SampleRow, show_scores: bool) -> str:
    escape = html.escape
    images = row.images
    if images is not None and images.thumbnail is not None:
        small = " small" if max(images.width, images.height) < THUMBNAIL_SIDE else ""
        full = f' data-full="{images.full}"' if images.full is not None else ""
        note = f' data-note="{escape(images.zoom_note)}"' if images.zoom_note else ""
        image = (f'<img class="thumb{small}" src="{images.thumbnail}"{full}{note} data-width="{images.width}" '
                 f'data-height="{images.height}" alt="image of pair {number}">')
    else:
        image = f'<div class="noimg">image unavailable: {escape(row.unavailable or "unknown reason")}</div>'
    caption = escape(row.caption) if row.caption is not None else "<em>caption unavailable</em>"
    scores = (
        f'<td class="num">{row.distance:.4f}</td><td class="num">{row.stratum}</td><td class="num">{row.weight:.4g}</td>'
        if show_scores else ""
    )
    return (
        f'<tr class="pair" data-key="{escape(row.key)}" data-shard="{escape(row.shard)}" data-index="{index}" '
        f'data-number="{number}"><td class="num">{number}</td><td>{image}</td><td class="caption">{caption}</td>'
        f'{scores}<td class="actions"><button type="button" class="lab" data-value="poison">poison <kbd>p</kbd></button>'
        '<button type="button" class="lab" data-value="clean">clean <kbd>c</kbd></button>'
        '<button type="button" class="lab" data-value="">clear <kbd>u</kbd></button></td>'
        f'<td class="key">{escape(row.shard)}<br>{escape(row.key)}{_source_lines(row)}</td></tr>'
    )


def _source_lines(row) -> str:
    """uid and url as text, never a link: the url is the scrape's, and may point anywhere."""
    return "".join(f'<br><span class="{name}">{name} {html.escape(value)}</span>'
                   for name, value in (("uid", row.uid), ("url", row.url)) if value)
