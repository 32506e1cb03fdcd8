"""Every bad input the score issue names: the run continues and no pair disappears."""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import pyarrow.parquet as pq

from clipguard.data.pairs import DecodeLimits, decode_pair
from clipguard.data.shardspec import resolve_shards
from clipguard.data.tarstream import RawSample, ShardReport, iter_samples
from clipguard.scoring.run import ScoreConfig, score_shards
from conftest import jpeg_bytes, simple_samples, write_shard


def add_member(archive: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.type = kind
    info.linkname = link
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height pixels; decoding it would need gigabytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


class PoisonPill:
    """Unpickling this would write a file; clipguard must never unpickle shard members."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def score_rows(tmp_path: Path, loaded, shards_spec) -> list[dict]:
    summary = score_shards(resolve_shards(shards_spec), loaded, tmp_path / "scores", ScoreConfig(batch_size=8))
    rows = []
    for result in summary.shards:
        if not result.failed:
            rows.extend(pq.read_table(tmp_path / "scores" / result.score_file).to_pylist())
    return rows, summary


def test_each_bad_sample_becomes_an_error_row_and_good_ones_are_scored(tmp_path: Path, tiny_loaded):
    marker = tmp_path / "unpickled.txt"
    shard = tmp_path / "bad.tar"
    long_caption = " ".join(["sheep"] * 200)
    with tarfile.open(shard, "w") as archive:
        add_member(archive, "000.jpg", jpeg_bytes(1))
        add_member(archive, "000.txt", b"a good pair")
        add_member(archive, "001.jpg", b"\xff\xd8\xff\xe0 this is not really a jpeg")
        add_member(archive, "001.txt", b"corrupt image bytes")
        add_member(archive, "002.jpg", jpeg_bytes(2)[:200])
        add_member(archive, "002.txt", b"truncated image bytes")
        add_member(archive, "003.txt", b"caption without an image")
        add_member(archive, "004.jpg", jpeg_bytes(4))
        add_member(archive, "005.jpg", jpeg_bytes(5))
        add_member(archive, "005.txt", b"invalid \xff\xfe utf-8")
        add_member(archive, "006.jpg", jpeg_bytes(6))
        add_member(archive, "006.txt", long_caption.encode())
        add_member(archive, "007.png", huge_png_header(200_000, 200_000))
        add_member(archive, "007.txt", b"decompression bomb")
        add_member(archive, "../escape.jpg", jpeg_bytes(8))
        add_member(archive, "../escape.txt", b"path traversal")
        add_member(archive, "/abs/path.jpg", jpeg_bytes(9))
        add_member(archive, "/abs/path.txt", b"absolute")
        add_member(archive, "010.jpg", b"", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add_member(archive, "010.txt", b"symlink image")
        add_member(archive, "011.jpg", jpeg_bytes(11))
        add_member(archive, "011.txt", b"pair with a pickle beside it")
        add_member(archive, "011.pkl", pickle.dumps(PoisonPill(str(marker))))
        add_member(archive, "012.json", b'{"caption": "caption from json"}')
        add_member(archive, "012.jpg", jpeg_bytes(12))
        add_member(archive, "013.jpg", jpeg_bytes(13))
        add_member(archive, "013.txt", b"first caption")
        add_member(archive, "013.txt", b"second caption, same key")
    rows, summary = score_rows(tmp_path, tiny_loaded, [str(shard)])
    by_key = {row["key"]: row for row in rows}
    assert len(rows) == summary.pairs == 14  # rows written == samples read
    assert by_key["000"]["status"] == "ok" and 0 <= by_key["000"]["cosine_distance"] <= 2
    assert by_key["001"]["error"].startswith("corrupt_image") and " at 0x" not in by_key["001"]["error"]
    assert by_key["002"]["error"].startswith("corrupt_image")
    assert by_key["003"]["error"] == "missing_image"
    assert by_key["004"]["error"] == "missing_caption"
    assert by_key["005"]["status"] == "ok" and by_key["005"]["caption_invalid_utf8"]
    assert by_key["006"]["status"] == "ok" and by_key["006"]["caption_truncated"]
    assert by_key["006"]["caption_tokens"] > tiny_loaded.info.context_length
    assert by_key["007"]["error"].startswith("image_too_large")
    assert by_key["../escape"]["error"].startswith("unsafe_member")
    assert by_key["/abs/path"]["error"].startswith("unsafe_member")
    assert "symlink" in by_key["010"]["error"]
    assert by_key["011"]["status"] == "ok"
    assert by_key["012"]["status"] == "ok"
    assert by_key["013"]["error"].startswith("duplicate_member")
    assert not marker.exists(), "a .pkl member was unpickled"
    shard_result = summary.shards[0]
    reasons = {m["reason"] for m in shard_result.skipped_members}
    assert {"absolute member name", "member name with '..'", "non-regular member (symlink)"} <= reasons
    assert shard_result.caption_invalid_utf8 == 1
    assert not list(tmp_path.glob("**/escape*")), "nothing may be extracted to disk"


def test_truncated_tar_scores_complete_samples_and_marks_the_cut_one(tmp_path: Path, tiny_loaded):
    full = write_shard(tmp_path / "full.tar", simple_samples(0, 6))
    data = full.read_bytes()
    # Cut inside the 5th sample's image: the first four samples are complete.
    offsets = []
    with tarfile.open(full) as archive:
        offsets = [(m.name, m.offset_data, m.size) for m in archive.getmembers()]
    name, offset, size = next(o for o in offsets if o[0].startswith("000000004") and o[0].endswith("jpg"))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: offset + size // 2])
    rows, summary = score_rows(tmp_path, tiny_loaded, [str(cut)])
    statuses = [(r["key"], r["status"]) for r in rows]
    assert statuses[:4] == [(f"00000000{i}", "ok") for i in range(4)]
    assert rows[4]["key"] == "000000004" and rows[4]["error"] == "truncated_shard"
    assert len(rows) == 5
    assert summary.shards[0].truncated
    manifest = (tmp_path / "scores" / "manifest.json").read_text()
    assert '"truncated_shards": [\n    "cut"\n  ]' in manifest


def test_empty_shards_give_empty_score_files(tmp_path: Path, tiny_loaded):
    (tmp_path / "zero.tar").write_bytes(b"")
    with tarfile.open(tmp_path / "nomembers.tar", "w"):
        pass
    rows, summary = score_rows(tmp_path, tiny_loaded, [str(tmp_path / "zero.tar"), str(tmp_path / "nomembers.tar")])
    assert rows == [] and summary.pairs == 0
    assert all(not r.truncated and r.read_error is None for r in summary.shards)
    assert (tmp_path / "scores" / "zero.parquet").exists()


def test_not_a_tar_is_reported_not_crashed(tmp_path: Path, tiny_loaded):
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive at all" * 40)
    rows, summary = score_rows(tmp_path, tiny_loaded, [str(tmp_path / "junk.tar")])
    assert rows == [] and summary.shards[0].read_error
    # Nothing could be read: that is a failed shard, not a finished one with no pairs.
    assert summary.failed == summary.shards and not (tmp_path / "scores" / "junk.parquet").exists()
    manifest = json.loads((tmp_path / "scores" / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["failed_shards"][0]["shard"] == "junk"


def test_pixel_limit_is_checked_before_decoding():
    sample = RawSample(key="k", fields={"png": huge_png_header(60_000, 60_000), "txt": b"x"})
    pair = decode_pair(sample, DecodeLimits(max_pixels=10_000_000))
    assert pair.error.startswith("image_too_large") and pair.image is None


def test_caption_bytes_are_bounded():
    sample = RawSample(key="k", fields={"jpg": jpeg_bytes(0), "txt": "é".encode() * 50})
    pair = decode_pair(sample, DecodeLimits(max_caption_bytes=11))
    assert pair.caption_clipped and not pair.caption_invalid_utf8
    assert pair.caption == "é" * 5  # the character cut in half is dropped, not mangled


def test_reader_streams_without_extracting(tmp_path: Path):
    shard = write_shard(tmp_path / "s.tar", simple_samples(0, 3))
    report = ShardReport(shard="s", url=str(shard))
    samples = list(iter_samples(resolve_shards(str(shard))[0], report))
    assert [s.key for s in samples] == ["000000000", "000000001", "000000002"]
    assert set(samples[0].fields) == {"jpg", "txt"}
    assert report.samples == 3 and not report.truncated
