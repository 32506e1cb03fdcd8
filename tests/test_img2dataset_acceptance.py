"""img2dataset -> clipguard score -> filter --keep-list --subset-file, end to end.

img2dataset runs in its own virtualenv (it pins webdataset<0.3, clipguard needs 1.x), built once
and kept under the system temp folder; it downloads real JPEGs and two 404s from a local HTTP
server. Then the uids, urls and img2dataset's failures are checked in every output.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from clipguard.cli.main import app
from tests.conftest import jpeg_bytes

runner = CliRunner()
VENV = Path(tempfile.gettempdir()) / "clipguard-test-img2dataset-venv"
N_IMAGES, N_MISSING = 6, 2


def _img2dataset_venv() -> Path:
    exe = VENV / "bin" / "img2dataset"
    if exe.is_file():
        return exe
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    made = subprocess.run([sys.executable, "-m", "venv", str(VENV)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a virtualenv for img2dataset: {made.stderr[-500:]}")
    pip = subprocess.run(
        [str(VENV / "bin" / "pip"), "install", "-q", "img2dataset"], capture_output=True, text=True, env=env, timeout=900
    )
    if pip.returncode != 0 or not exe.is_file():
        pytest.skip(f"pip cannot install img2dataset here: {(pip.stderr or pip.stdout)[-800:]}")
    return exe


@pytest.fixture(scope="session")
def img2dataset_exe() -> Path:
    return _img2dataset_venv()


class _Images(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404, "File not found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def image_server():
    _Images.files = {f"/img/{i}.jpg": jpeg_bytes(7000 + i, size=64) for i in range(N_IMAGES)}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _uid(i: int) -> str:
    return f"{0x1234_5678_9abc_def0 + i:016x}{0x0fed_cba9_8765_4321 * (i + 1) % (1 << 64):016x}"


def test_img2dataset_to_keep_list_and_subset(tmp_path, img2dataset_exe, image_server, tiny_checkpoint):
    rows = [{"url": f"{image_server}/img/{i}.jpg", "caption": f"a photo number {i}", "uid": _uid(i)} for i in range(N_IMAGES)]
    rows += [{"url": f"{image_server}/gone/{j}.jpg", "caption": "lost", "uid": _uid(100 + j)} for j in range(N_MISSING)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "urls.parquet")
    shards = tmp_path / "shards"
    downloaded = subprocess.run(
        [
            str(img2dataset_exe), "--url_list", str(tmp_path / "urls.parquet"), "--input_format", "parquet",
            "--url_col", "url", "--caption_col", "caption", "--save_additional_columns", '["uid"]',
            "--output_format", "webdataset", "--output_folder", str(shards), "--processes_count", "1",
            "--thread_count", "2", "--image_size", "64", "--distributor", "multiprocessing",
            "--enable_wandb", "False", "--retries", "0", "--timeout", "5",
        ],
        capture_output=True, text=True, timeout=300, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
    )
    assert downloaded.returncode == 0, downloaded.stderr[-2000:]
    assert (shards / "00000.tar").is_file() and (shards / "00000.parquet").is_file()

    scores = tmp_path / "scores"
    scored = runner.invoke(app, ["score", str(shards), "--out", str(scores), "--model", str(tiny_checkpoint), "--workers", "0", "--batch-size", "4"])
    assert scored.exit_code == 0, scored.output
    assert "lost by the scrape" in scored.output and f"{N_MISSING} of {N_IMAGES + N_MISSING}" in scored.output
    table = pq.read_table(scores / "00000.parquet").to_pylist()
    assert len(table) == N_IMAGES
    by_url = {r["url"]: r for r in rows}
    for row in table:
        source = by_url[row["url"]]
        assert row["uid"] == source["uid"] and row["source_status"] == "success" and row["source_error"] is None
        assert row["status"] == "ok"
    stats = json.loads((scores / "00000_stats.json").read_text())
    scrape = stats["result"]["scrape"]
    assert (scrape["attempted"], scrape["succeeded"], scrape["failed"]) == (N_IMAGES + N_MISSING, N_IMAGES, N_MISSING)
    assert scrape["failed_by_status"] == {"failed_to_download": N_MISSING}
    assert sorted(scrape["failed_uids"]) == sorted(_uid(100 + j) for j in range(N_MISSING))

    # A gamma in the middle of the scores, so that both kept and flagged pairs exist.
    distances = sorted(r["cosine_distance"] for r in table)
    gamma = (distances[N_IMAGES // 2 - 1] + distances[N_IMAGES // 2]) / 2
    expected_kept = {r["uid"] for r in table if r["cosine_distance"] < gamma}
    assert 0 < len(expected_kept) < N_IMAGES

    for copy in (True, False):
        out, quarantine = tmp_path / f"clean-{copy}", tmp_path / f"quarantine-{copy}"
        keep, subset = tmp_path / f"keep-{copy}.parquet", tmp_path / f"subset-{copy}.npy"
        filtered = runner.invoke(app, [
            "filter", str(shards), "--out", str(out), "--quarantine", str(quarantine), "--gamma", repr(gamma),
            "--scores", str(scores), "--model", str(tiny_checkpoint), "--workers", "0",
            "--keep-list", str(keep), "--subset-file", str(subset), *([] if copy else ["--no-copy-shards"]),
        ])
        assert filtered.exit_code == 0, filtered.output
        kept = pq.read_table(keep).to_pylist()
        assert {r["uid"] for r in kept} == expected_kept
        assert all(r["url"] == by_url[r["url"]]["url"] and by_url[r["url"]]["uid"] == r["uid"] for r in kept)
        assert {r["shard"] for r in kept} == {"00000"}
        array = np.load(subset, allow_pickle=False)
        assert array.dtype == np.dtype("u8,u8") and len(array) == len(expected_kept)
        assert array.tolist() == sorted(array.tolist())  # the resharder searches it
        assert {f"{hi:016x}{lo:016x}" for hi, lo in array.tolist()} == expected_kept
        manifest = json.loads((out / "filter_manifest.json").read_text())
        assert manifest["totals"]["read"] == N_IMAGES and manifest["totals"]["scrape_lost"] == N_MISSING
        assert manifest["totals"]["kept"] == len(expected_kept)
        assert manifest["inputs"][0]["scrape"]["failed"] == N_MISSING
        tars = sorted(p.name for p in out.glob("*.tar")) + sorted(p.name for p in quarantine.glob("*.tar"))
        if copy:
            sizes = json.loads((out / "sizes.json").read_text())
            assert sum(sizes.values()) == len(expected_kept) and set(sizes) == {p.name for p in out.glob("*.tar")}
            q_sizes = json.loads((quarantine / "sizes.json").read_text())
            assert sum(q_sizes.values()) == N_IMAGES - len(expected_kept)
        else:
            assert tars == [] and not (out / "sizes.json").exists()
            assert manifest["copied_shards"] is False

    # The gate's report names the top flagged pairs by uid and url too.
    gated = runner.invoke(app, [
        "gate", str(shards), "--scores", str(scores), "--gamma", repr(gamma), "--model", str(tiny_checkpoint),
        "--workers", "0", "--format", "json", "--max-flagged-rate", "1",
    ])
    assert gated.stdout.strip(), gated.output
    report = json.loads(gated.stdout)
    flagged_uids = {r["uid"] for r in table if r["cosine_distance"] >= gamma}
    assert report["top_flagged"] and all(e["uid"] in flagged_uids and by_url[e["url"]]["uid"] == e["uid"] for e in report["top_flagged"])
