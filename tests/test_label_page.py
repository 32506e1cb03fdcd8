"""The labelling page in a real headless Chromium: keys, autosave across a reload, zoom, and a
download that `clipguard calibrate` accepts on its own (its sample design rides in the CSV).

Shards are written with webdataset's TarWriter and scored by the tiny open_clip model. The browser
tests skip, with the reason, only where Chromium, its driver or selenium cannot be found; the
label-file tests below them always run.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipguard.cli.main import app
from clipguard.labelling import DESIGN_LINE_PREFIX, design_comment_line
from clipguard import labelling, labelpage
from clipguard.labelpage import STORAGE_PREFIX
from conftest import simple_samples, write_shard

runner = CliRunner()
N_PAIRS = 24
N_LABELLED = 20
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_CANDIDATES = ("chromedriver",)


def _find(names: tuple[str, ...], env: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    for name in names:
        found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("page")
    for s in range(2):
        write_shard(root / "shards" / f"{s:05d}.tar", simple_samples(s, 15))
    scores = root / "scores"
    result = runner.invoke(app, ["score", str(root / "shards"), "--out", str(scores), "--model", str(tiny_checkpoint),
                                 "--workers", "0"])
    assert result.exit_code == 0, result.output
    pages = {}
    for seed in (1, 2):
        pages[seed] = root / f"label{seed}"
        result = runner.invoke(app, ["sample", str(scores), "-n", str(N_PAIRS), "--seed", str(seed),
                                     "--out", str(pages[seed])])
        assert result.exit_code == 0, result.output
    return {"root": root, "scores": scores, "pages": pages}


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install '.[test]')")
    from selenium.webdriver.chrome.service import Service

    chromium = _find(CHROMIUM_CANDIDATES, "CLIPGUARD_CHROMIUM")
    driver_path = _find(DRIVER_CANDIDATES, "CLIPGUARD_CHROMEDRIVER")
    if chromium is None or driver_path is None:
        pytest.skip("Chromium or chromedriver not found (apt-get install chromium chromium-driver, or set "
                    "CLIPGUARD_CHROMIUM / CLIPGUARD_CHROMEDRIVER)")
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield driver, downloads
    finally:
        driver.quit()


def open_page(driver, folder: Path, fresh: bool = False) -> None:
    """Open a sample's page; ``fresh`` forgets only that sample's save (file:// pages share storage)."""
    driver.get((folder / "index.html").resolve().as_uri())
    if fresh:
        sid = json.loads((folder / "sample_design.json").read_text())["page"]["sample_id"]
        driver.execute_script("localStorage.removeItem(arguments[0])", STORAGE_PREFIX + sid)
        driver.refresh()


def press(driver, keys: str) -> None:
    from selenium.webdriver.common.by import By

    body = driver.find_element(By.TAG_NAME, "body")
    for key in keys:
        body.send_keys(key)


def page_labels(driver) -> dict[tuple[str, str], str]:
    """(shard, key) -> 'poison' / 'clean' as the page shows it (the row's colour class)."""
    return {tuple(pair): value for pair, value in driver.execute_script(
        "return Array.from(document.querySelectorAll('tbody tr.pair')).filter(r => r.classList.contains('poison')"
        " || r.classList.contains('clean')).map(r => [[r.dataset.shard, r.dataset.key],"
        " r.classList.contains('poison') ? 'poison' : 'clean'])")}


def progress_text(driver) -> str:
    return driver.execute_script("return document.getElementById('progress').textContent")


def wait_for_download(folder: Path, name: str = "labels.csv", timeout: float = 15.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = folder / name
        if path.is_file() and not list(folder.glob("*.crdownload")) and path.stat().st_size > 0:
            return path
        time.sleep(0.1)
    raise AssertionError(f"no {name} in {folder} after {timeout} s: {sorted(p.name for p in folder.iterdir())}")


def test_keyboard_labels_survive_a_reload_and_the_download_calibrates_on_its_own(tmp_path, world, browser):
    driver, downloads = browser
    folder = world["pages"][1]
    order = json.loads((folder / "sample_design.json").read_text())["page"]["order"]
    csv_pairs = [(r["shard"], r["key"]) for r in csv.DictReader(open(folder / "sample.csv", encoding="utf-8"))]
    open_page(driver, folder, fresh=True)
    assert progress_text(driver).startswith(f"0 of {N_PAIRS} labelled")

    keys = "".join("p" if i % 4 == 0 else "c" for i in range(N_LABELLED))  # p / c label, then move on
    press(driver, keys)
    expected = {csv_pairs[order[i]]: ("poison" if key == "p" else "clean") for i, key in enumerate(keys)}
    assert page_labels(driver) == expected
    assert progress_text(driver).startswith(f"{N_LABELLED} of {N_PAIRS} labelled (5 poison, 15 clean)")

    driver.refresh()
    assert page_labels(driver) == expected
    assert progress_text(driver).startswith(f"{N_LABELLED} of {N_PAIRS} labelled")
    current = driver.execute_script("return document.querySelector('tr.current').dataset.number")
    assert current == str(N_LABELLED + 1)  # the cursor comes back too: the next pair to label

    driver.find_element("id", "download").click()
    downloaded = wait_for_download(downloads)
    assert downloaded.read_text(encoding="utf-8").startswith(DESIGN_LINE_PREFIX)
    elsewhere = tmp_path / "Downloads"  # no sample_design.json here: the CSV carries it
    elsewhere.mkdir()
    moved = Path(shutil.move(str(downloaded), elsewhere / "labels.csv"))
    result = runner.invoke(app, ["calibrate", str(world["scores"]), "--labels", str(moved), "--out", str(tmp_path / "cal"),
                                 "--max-f1"])
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert payload["labels"]["n_labelled"] == N_LABELLED and payload["labels"]["n_poison_labels"] == 5
    assert payload["labels"]["n_unlabelled"] == N_PAIRS - N_LABELLED
    assert payload["labels"]["details"]["design_embedded"] is True
    with open(moved, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle.readlines()[1:]))
    assert [(r["shard"], r["key"]) for r in rows] == csv_pairs  # sample.csv's order, not the page's
    assert {(r["shard"], r["key"]): r["label"] for r in rows if r["label"]} == expected


def test_clear_buttons_zoom_and_separate_saves_per_sample(world, browser):
    from selenium.webdriver.common.by import By

    driver, _ = browser
    first, second = world["pages"][1], world["pages"][2]
    open_page(driver, first, fresh=True)
    press(driver, "cc")
    open_page(driver, second, fresh=True)
    assert progress_text(driver).startswith(f"0 of {N_PAIRS}")  # the first sample's labels stay its own
    page = driver.find_element(By.TAG_NAME, "body").text
    for legend in ("j / k next / previous", "p poison", "c clean", "u clear", "z zoom"):
        assert legend in page
    assert "cosine distance" not in page

    press(driver, "jjp")  # the third pair is poison, the cursor moves to the fourth
    assert progress_text(driver).startswith(f"1 of {N_PAIRS}")
    press(driver, "ku")  # back to the third, clear it
    assert progress_text(driver).startswith(f"0 of {N_PAIRS}") and page_labels(driver) == {}

    rows = driver.find_elements(By.CSS_SELECTOR, "tbody tr.pair")
    rows[4].find_element(By.CSS_SELECTOR, "button[data-value=clean]").click()
    assert page_labels(driver) == {(rows[4].get_attribute("data-shard"), rows[4].get_attribute("data-key")): "clean"}
    rows[4].find_element(By.CSS_SELECTOR, "button[data-value='']").click()
    assert page_labels(driver) == {}

    press(driver, "z")
    zoom = driver.execute_script(
        "var z = document.getElementById('zoom'), i = document.getElementById('zoom-img');"
        "return [z.classList.contains('open'), i.complete && i.naturalWidth, i.getBoundingClientRect().width,"
        " document.getElementById('zoom-number').textContent, document.getElementById('zoom-size').textContent]")
    is_open, natural_width, shown_width, number, size_text = zoom
    assert is_open and natural_width == 72  # the full image as stored (the shards' 72 px JPEGs)
    assert shown_width % 72 == 0 and shown_width >= 72 * 4  # whole-pixel scaling
    assert number == "5" and size_text.startswith("72 x 72 px")
    press(driver, "p")  # labelling works in the zoom view too, and moves it on
    assert driver.execute_script("return document.getElementById('zoom-number').textContent") == "6"
    press(driver, "\ue00c")  # Escape
    assert not driver.execute_script("return document.getElementById('zoom').classList.contains('open')")
    assert progress_text(driver).startswith(f"1 of {N_PAIRS}")

    open_page(driver, first)  # another sample: its own save, untouched by this one
    assert progress_text(driver).startswith(f"2 of {N_PAIRS}")
    open_page(driver, second)
    assert progress_text(driver).startswith(f"1 of {N_PAIRS}")



def test_two_tabs_of_one_page_do_not_overwrite_each_other(world, browser):
    driver, _ = browser
    folder = world["pages"][2]
    open_page(driver, folder, fresh=True)
    first_tab = driver.current_window_handle
    driver.switch_to.new_window("tab")
    open_page(driver, folder)
    press(driver, "p")  # labelled in the second tab ...
    driver.switch_to.window(first_tab)
    assert progress_text(driver).startswith(f"1 of {N_PAIRS}")  # ... shows up in the first
    press(driver, "jc")  # this tab kept its place (pair 1): pair 2 is clean, and the poison is kept
    assert sorted(page_labels(driver).values()) == ["clean", "poison"]
    driver.refresh()
    assert progress_text(driver).startswith(f"2 of {N_PAIRS}")
    for handle in driver.window_handles:
        if handle != first_tab:
            driver.switch_to.window(handle)
            driver.close()
    driver.switch_to.window(first_tab)


# Label files with an embedded design, without a browser.

def page_style_csv(path: Path, folder: Path, design_line: str | None = None, quote_line: bool = False) -> Path:
    payload = json.loads((folder / "sample_design.json").read_text())
    line = design_line if design_line is not None else design_comment_line(payload)
    if quote_line:
        line = f'"{line}",,'  # as a spreadsheet may save it
    rows = list(csv.DictReader(open(folder / "sample.csv", encoding="utf-8")))
    body = [f"{r['key']},{r['shard']},{'poison' if i % 3 == 0 else 'clean'}" for i, r in enumerate(rows)]
    path.write_text("\n".join([line, "key,shard,label", *body]) + "\n", encoding="utf-8")
    return path


def calibrate(world, labels: Path, out: Path, *extra: str):
    return runner.invoke(app, ["calibrate", str(world["scores"]), "--labels", str(labels), "--out", str(out), "--max-f1",
                                 *extra])


def test_embedded_design_is_used_and_checked(tmp_path, world):
    first, second = world["pages"][1], world["pages"][2]
    quoted = calibrate(world, page_style_csv(tmp_path / "quoted.csv", first, quote_line=True), tmp_path / "a")
    assert quoted.exit_code == 0, quoted.output
    assert json.loads((tmp_path / "a" / "calibration.json").read_text())["labels"]["n_labelled"] == N_PAIRS

    labels = page_style_csv(tmp_path / "labels.csv", first)
    same = calibrate(world, labels, tmp_path / "b", "--design", str(first / "sample_design.json"))
    assert same.exit_code == 0, same.output
    other = calibrate(world, labels, tmp_path / "c", "--design", str(second / "sample_design.json"))
    assert other.exit_code == 2 and "another sample" in other.output

    damaged = page_style_csv(tmp_path / "damaged.csv", first, design_line=DESIGN_LINE_PREFIX + "not*base64")
    result = calibrate(world, damaged, tmp_path / "d")
    assert result.exit_code == 2 and "design line" in result.output and "damaged" in result.output
    not_design = DESIGN_LINE_PREFIX + base64.b64encode(b'{"format": "something-else"}').decode()
    result = calibrate(world, page_style_csv(tmp_path / "foreign.csv", first, design_line=not_design), tmp_path / "e")
    assert result.exit_code == 2 and "not a clipguard sample design" in result.output


def test_without_embedded_or_neighbouring_design_the_error_points_to_the_page_download(tmp_path, world):
    rows = list(csv.DictReader(open(world["pages"][1] / "sample.csv", encoding="utf-8")))
    plain = tmp_path / "plain.csv"
    plain.write_text("key,shard,label\n" + "".join(f"{r['key']},{r['shard']},clean\n" for r in rows), encoding="utf-8")
    result = calibrate(world, plain, tmp_path / "out")
    assert result.exit_code == 2 and "no sample design" in result.output and "carries its design" in result.output


# What the page embeds of an image, without a browser.

def _bytes_of(uri: str) -> bytes:
    return base64.b64decode(uri.split(",", 1)[1])


def test_page_images_keep_the_stored_image_for_the_zoom_view(monkeypatch):
    import io

    import numpy as np
    from PIL import Image

    from clipguard import labelpage
    from clipguard.data.pairs import DecodeLimits
    from conftest import jpeg_bytes

    small = labelpage.page_images(jpeg_bytes(1, size=72), DecodeLimits())
    assert small.full is None and _bytes_of(small.thumbnail) == jpeg_bytes(1, size=72)  # embedded once

    large_jpeg = jpeg_bytes(2, size=600)
    large = labelpage.page_images(large_jpeg, DecodeLimits(draft_size=64))  # no draft: full resolution
    assert (large.width, large.height) == (600, 600) and _bytes_of(large.full) == large_jpeg
    assert Image.open(io.BytesIO(_bytes_of(large.thumbnail))).size == (labelpage.THUMBNAIL_SIDE,) * 2

    pixels = np.random.default_rng(3).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    bmp = io.BytesIO()
    Image.fromarray(pixels).save(bmp, format="BMP")
    shown = labelpage.page_images(bmp.getvalue(), DecodeLimits())
    # The page decodes what the scorer decodes and nothing more: BMP is not a web format.
    assert shown.thumbnail is None and shown.error.startswith("corrupt_image: not a JPEG, PNG, WEBP image")

    monkeypatch.setattr(labelpage, "MAX_ZOOM_BYTES", 60_000)  # a noisy 600 px JPEG is larger than this
    reduced = labelpage.page_images(large_jpeg, DecodeLimits())
    assert len(_bytes_of(reduced.full)) <= 60_000 and reduced.zoom_note.startswith("reduced to ")
    assert Image.open(io.BytesIO(_bytes_of(reduced.full))).size[0] < 600 and "0.057 MiB" in reduced.zoom_note

    refused = labelpage.page_images(large_jpeg, DecodeLimits(max_pixels=10_000))
    assert refused.thumbnail is None and refused.error.startswith("image_too_large")


def test_a_row_with_uid_and_url_renders_them_as_escaped_text():
    # The page once named an `escape` that only existed inside another function: any sample
    # carrying img2dataset's uid or url crashed the page.
    row = labelling.SampleRow(key="k", shard="s", caption="c", distance=0.5, inclusion_probability=1.0,
                              stratum=0, uid="00ff", url="http://x/<script>.jpg")
    cell = labelpage._render_row(1, 0, row, show_scores=False)
    assert "uid 00ff" in cell and "http://x/&lt;script&gt;.jpg" in cell and "<a " not in cell
