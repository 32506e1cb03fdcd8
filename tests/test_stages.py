"""The reading stages one by one, on plain lists where they allow it, and composed on real shards."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from conftest import jpeg_bytes, simple_samples, write_shard

from clipguard.data.handlers import CountFailures, ShardReadError, record_and_continue, reraise
from clipguard.data.pairs import DecodeLimits, Pair, decode_pair
from clipguard.data.shardspec import Shard, resolve_shards
from clipguard.data.stages import (
    Decoded,
    batched,
    decode_pairs,
    preprocess_images,
    read_pairs,
    read_shards,
    tokenize_batches,
    without_shard_ends,
)
from clipguard.data.tarstream import (
    Member,
    RawSample,
    ShardEnd,
    ShardReport,
    ShardStart,
    group_by_key,
    iter_samples,
    open_shards,
)


def _report(name: str = "s") -> ShardReport:
    return ShardReport(shard=name, url=f"/data/{name}.tar")


def _member(name: str, data: bytes | None = b"x", problem: str | None = None) -> Member:
    return Member(name=name, ext=name.split(".", 1)[1], size=len(data or b""), data=data, problem=problem)


def test_batched_keeps_every_item_and_ends_short():
    assert list(batched(range(5), 2)) == [[0, 1], [2, 3], [4]]
    assert list(batched([], 3)) == []


def test_group_by_key_forms_samples_counts_them_and_marks_the_cut_one():
    report = _report()
    end = ShardEnd(report, cut="truncated_shard")
    items = [
        ShardStart(report),
        _member("a.jpg"), _member("a.txt"),
        _member("b.jpg"), _member("b.jpg", b"y"), _member("b.pkl", None, "unsafe_member: x"),
        _member("c.jpg", None),  # the stream ended inside it
        end,
    ]  # fmt: skip
    out = list(group_by_key(items))
    a, b, c = out[:3]
    assert out[3] is end and report.samples == 3
    assert (a.key, sorted(a.fields), a.problems, a.shard) == ("a", ["jpg", "txt"], [], "s")
    # Every member is kept as it was for copying; only safe, first-of-a-kind ones become fields.
    assert [m.name for m in b.members] == ["b.jpg", "b.jpg", "b.pkl"] and b.fields == {"jpg": b"x"}
    assert b.problems == ["duplicate_member: two 'jpg' members for key b", "unsafe_member: x"]
    assert c.fields == {} and c.problems == ["truncated_shard"] and len(c.members) == 1


def test_group_by_key_never_joins_samples_across_shards():
    first, second = _report("one"), _report("two")
    items = [ShardStart(first), _member("k.jpg"), ShardEnd(first)]
    items += [ShardStart(second), _member("k.txt"), ShardEnd(second)]
    out = list(group_by_key(items))
    samples = [item for item in out if isinstance(item, RawSample)]
    assert [(s.shard, sorted(s.fields)) for s in samples] == [("one", ["jpg"]), ("two", ["txt"])]
    assert (first.samples, second.samples) == (1, 1)


def test_decode_and_preprocess_turn_failures_into_reasons_and_pass_shard_marks():
    end = ShardEnd(_report())
    good = RawSample("good", {"jpg": jpeg_bytes(1), "txt": b"a cat"})
    odd = RawSample("odd", {"jpg": jpeg_bytes(2, size=40), "txt": b"a dog"})
    blank = RawSample("blank", {"jpg": jpeg_bytes(3), "txt": b""})

    def preprocess(image: Image.Image):
        if image.size != (72, 72):
            raise ValueError("unexpected size")
        return "pixels"

    out = list(preprocess_images(decode_pairs([good, odd, blank, end], DecodeLimits()), preprocess))
    assert out[3] is end
    assert [(d.pair.key, d.ok, d.pixels, d.sample) for d in out[:3]] == [
        ("good", True, "pixels", good), ("odd", False, None, odd), ("blank", False, None, blank)
    ]  # fmt: skip
    assert out[1].pair.error == "preprocess_failed: ValueError: unexpected size"
    assert out[2].pair.error == "empty_caption"
    assert all(d.pair.image is None for d in out[:3]), "decoded images are not carried past preprocessing"


def test_tokenize_batches_tokenizes_only_the_ready_pairs():
    ready = Decoded(Pair("r", None, "a cat", None), pixels="p")
    failed = Decoded(Pair("f", None, "a dog", None, error="corrupt_image: x"))
    end = ShardEnd(_report())
    first, second = tokenize_batches([[ready, failed], [failed, end]], lambda captions: list(captions))
    assert (first.ready, first.tokens) == ([ready], ["a cat"])
    assert (second.ready, second.tokens, second.items[-1]) == ([], None, end)


def test_without_shard_ends_keeps_the_failed_ones_on_request():
    ok, failed = _report("ok"), _report("bad")
    failed.read_error = "cannot open shard: gone"
    items = ["sample", ShardEnd(ok), ShardEnd(failed)]
    assert list(without_shard_ends(items)) == ["sample"]
    assert [getattr(i, "report", i) for i in without_shard_ends(items, keep_failed=True)] == ["sample", failed]


def test_handlers_say_what_happens_next():
    report = _report()
    report.read_error = "tar stream ended early: x"
    error = ShardReadError(report)
    assert str(error) == "/data/s.tar: tar stream ended early: x" and error.report is report
    with pytest.raises(ShardReadError):
        reraise(error)
    assert record_and_continue(error) is True
    counting = CountFailures()
    assert counting(error) and counting(error)
    assert counting.counts == Counter({"shard_error: tar stream ended early: x": 2})


def test_a_shard_that_cannot_open_is_recorded_then_left_to_the_handler(tmp_path: Path):
    missing = Shard(url=str(tmp_path / "missing.tar"), name="missing")
    good = Shard(url=str(write_shard(tmp_path / "good.tar", simple_samples(0, 2))), name="good")
    with pytest.raises(ShardReadError, match="cannot open shard"):
        list(open_shards([missing, good]))  # the default policy: a failure ends the run
    opened = list(open_shards([missing, good], record_and_continue))
    assert [o.stream is None for o in opened] == [True, False]
    assert opened[0].report.source_failed and opened[0].report.failed
    opened[1].stream.close()
    # A handler that says stop: the failed shard still comes out, the next one is never opened.
    stopped = list(open_shards([missing, good], lambda error: False))
    assert [o.shard.name for o in stopped] == ["missing"]


def _truncated_shard(tmp_path: Path) -> Path:
    whole = write_shard(tmp_path / "whole.tar", simple_samples(0, 4))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return cut


def test_every_shard_reaches_the_end_of_the_pipeline_with_its_report(tmp_path: Path):
    good = write_shard(tmp_path / "good.tar", simple_samples(0, 3))
    cut = _truncated_shard(tmp_path)
    shards = [Shard(url=str(path), name=path.stem) for path in (good, tmp_path / "missing.tar", cut)]
    failures = CountFailures()
    items = list(read_shards(shards, handler=failures))
    ends = [item for item in items if isinstance(item, ShardEnd)]
    assert [(e.report.shard, e.report.truncated, e.report.source_failed) for e in ends] == [
        ("good", False, False), ("missing", False, True), ("cut", True, False)
    ]  # fmt: skip
    assert (ends[0].report.samples, ends[1].report.samples) == (3, 0) and ends[2].report.samples >= 1
    assert ends[2].cut == "truncated_shard" and items[-2].problems == ["truncated_shard"]
    assert sum(failures.counts.values()) == 2


def test_reraise_still_delivers_the_cut_sample_before_the_error(tmp_path: Path):
    shard = resolve_shards(str(_truncated_shard(tmp_path)))[0]
    seen: list[RawSample] = []
    with pytest.raises(ShardReadError, match="tar stream ended early"):
        for item in without_shard_ends(read_shards([shard])):
            seen.append(item)
    assert seen and seen[-1].problems == ["truncated_shard"]


def test_read_pairs_is_iter_samples_then_decode(tmp_path: Path):
    samples = simple_samples(0, 5)
    samples[1]["jpg"] = b"not an image"
    shard = resolve_shards(str(write_shard(tmp_path / "s.tar", samples)))[0]
    limits = DecodeLimits()
    expected = [decode_pair(raw, limits) for raw in iter_samples(shard, ShardReport.for_shard(shard))]
    got = list(without_shard_ends(read_pairs([shard], limits)))
    def essentials(pair: Pair):
        return pair.key, pair.caption, pair.image_sha256, pair.error, pair.image.tobytes() if pair.image else None

    assert [essentials(d.pair) for d in got] == [essentials(p) for p in expected]
    assert got[1].pair.error.startswith("corrupt_image")
