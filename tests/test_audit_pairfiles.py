"""The audit's per-pair columns on disk (`clipguard.audit.pairfiles`): appended a part at a time,
read back memory-mapped, equal to the same columns joined in memory; and the audit's pairs and
per-pair outputs are file pages, not the driver's own memory."""

from __future__ import annotations

import mmap
import random

import numpy as np
import pyarrow as pa
import pytest

from audit_worlds import KEYWORDS, World
from clipguard.audit import AuditConfig, run_audit
from clipguard.audit.inputs import PAIR_COLUMNS, load_pairs
from clipguard.audit.pairfiles import ColumnFiles, PairArrays, StringFile
from clipguard.executors.tasks import in_order


def _file_backed(array: np.ndarray) -> bool:
    """Whether the array's memory is a mapped file (somewhere down its chain of bases)."""
    while array is not None:
        if isinstance(array, (np.memmap, mmap.mmap)):
            return True
        array = getattr(array, "base", None)
    return False


def _blocks(rng):
    """Three blocks as parts give them: the matrix column 3, absent, then 5 wide."""
    for rows, width in ((4, 3), (2, None), (3, 5)):
        yield dict(value=rng.integers(0, 100, rows), score=rng.random(rows).astype(np.float32),
                   matrix=None if width is None else rng.integers(1, 2**63, (rows, width), dtype=np.uint64))


@pytest.mark.parametrize("on_disk", [True, False])
def test_columns_appended_by_block_read_back_whole(tmp_path, on_disk):
    dtypes = {"value": np.int64, "score": np.float32, "matrix": np.uint64}
    files = ColumnFiles(tmp_path / "cols" if on_disk else None, dtypes)
    blocks = list(_blocks(np.random.default_rng(0)))
    for block in blocks:
        files.add(**block)
    columns = files.open()
    assert files.rows == 9
    np.testing.assert_array_equal(columns["value"], np.concatenate([b["value"] for b in blocks]))
    np.testing.assert_array_equal(columns["score"], np.concatenate([b["score"] for b in blocks]))
    expected = np.zeros((9, 5), np.uint64)  # padded with 0 to the widest; the absent block is all 0
    expected[:4, :3], expected[6:, :] = blocks[0]["matrix"], blocks[2]["matrix"]
    np.testing.assert_array_equal(columns["matrix"], expected)
    assert [columns[name].dtype for name in dtypes] == [np.dtype(d) for d in dtypes.values()]
    assert all(_file_backed(c) == on_disk for c in columns.values())
    if on_disk:
        assert not columns["value"].flags.writeable  # read-only: no stage can change the input under another
        assert sorted(p.name for p in (tmp_path / "cols").iterdir()) == ["matrix.padded.npy", "score.bin", "value.bin"]
    with pytest.raises(ValueError, match="every column"):
        files.add(value=np.zeros(2), score=np.zeros(3, np.float32), matrix=None)


def test_empty_columns_and_a_stale_file_from_a_killed_run(tmp_path):
    (tmp_path / "value.bin").write_bytes(b"left by an earlier run")
    files = ColumnFiles(tmp_path, {"value": np.int64, "matrix": np.uint64})
    files.add(value=np.zeros(0, np.int64), matrix=None)
    columns = files.open()
    assert columns["value"].shape == (0,) and columns["matrix"].shape == (0, 0)


def test_pair_arrays_gather_a_table_at_each_pairs_group(tmp_path):
    table = np.array([10, 20, 30], np.int64)
    index = np.random.default_rng(1).integers(0, 3, 1_000)
    for folder in (tmp_path, None):
        gathered = PairArrays(folder).gather("group_value", table, index, block=64)
        np.testing.assert_array_equal(gathered, table[index])
        assert _file_backed(gathered) == (folder is not None)
    assert (tmp_path / "group_value.npy").is_file()


def test_keys_appended_by_block_are_read_back_from_a_mapped_file(tmp_path):
    keys = [f"shard-7/key-{i:06d}-" + "x" * 40 for i in range(20_000)]  # ~1.2 MB of text
    blocks = [pa.array(keys[start:start + 5_000]) for start in range(0, len(keys), 5_000)]
    for folder in (tmp_path, None):
        strings = StringFile(folder, "key")
        for block in blocks:
            strings.add(block)
        before = pa.total_allocated_bytes()
        read = strings.open()
        assert read.to_pylist() == keys and read.take(pa.array([3, 19_999])).to_pylist() == [keys[3], keys[-1]]
        held = pa.total_allocated_bytes() - before
        if folder is None:
            assert held > 1_000_000  # joined in arrow's own memory
        else:
            assert held < 50_000  # the keys' text and offsets are the file's pages
    assert StringFile(tmp_path / "none", "key").open().to_pylist() == []


def test_results_in_order_whatever_order_tasks_finish_in():
    finished = list(enumerate("abcdefgh"))
    random.Random(2).shuffle(finished)
    assert "".join(in_order(iter(finished))) == "abcdefgh"


def test_pairs_loaded_through_files_equal_pairs_loaded_in_memory(tmp_path):
    scores = World(3).clean(n=120).with_patches().fan_in("sheep", "aeroplane").write(tmp_path / "w", shards=3)
    in_memory = load_pairs(scores, keywords=KEYWORDS)
    mapped = load_pairs(scores, keywords=KEYWORDS, work=tmp_path / "pairs")
    assert len(mapped) == len(in_memory) > 100 and len(in_memory.parts) == 3
    column = lambda pairs, name: pairs.shard.codes if name == "shard" else getattr(pairs, name)  # noqa: E731
    for name in PAIR_COLUMNS:
        np.testing.assert_array_equal(column(mapped, name), column(in_memory, name), err_msg=name)
        assert _file_backed(column(mapped, name)) and not _file_backed(column(in_memory, name)), name
    assert list(mapped.key) == list(in_memory.key) and list(mapped.shard) == list(in_memory.shard)
    np.testing.assert_array_equal(mapped.vectors("image", np.arange(5)), in_memory.vectors("image", np.arange(5)))


def test_the_audits_pairs_and_per_pair_outputs_are_mapped_files(tmp_path):
    scores = World(7).clean().fan_in("sheep", "aeroplane", captions=7).write(tmp_path / "w", shards=2)
    result = run_audit(AuditConfig(scores=scores, out=tmp_path / "audit", keywords=KEYWORDS))
    t = result.tables
    for name, column in [("caption_hash", result.pairs.caption_hash), ("similarity", result.pairs.similarity),
                         ("caption_id", t.caption_id), ("image_id", t.image_id), ("image_group", t.image_group),
                         ("caption_group", t.caption_group), ("image_class", t.image_class)]:
        assert _file_backed(column), name
    # Still readable after the working folder is gone (an unlinked file lives while it is mapped).
    assert not (tmp_path / "audit" / ".search-index").exists()
    assert int(t.image_id.max()) + 1 == len(np.unique(t.image_id)) and t.image_class.min() >= -1
    assert any(f.kind == "image_fan_in" for f in result.findings)


def test_a_working_file_that_cannot_be_written_is_a_clear_error_not_a_traceback(tmp_path):
    """A full disk under --out (/dev/full behind the keys' file: every write there fails with
    ENOSPC) stops the audit with a message naming the working folder, exit 2 at the command
    line, and the working folder is still removed."""
    import json

    from typer.testing import CliRunner

    from clipguard.audit import AuditInputError
    from clipguard.cli.main import app

    scores = World(7).clean(n=60).write(tmp_path / "w")
    out = tmp_path / "audit"
    (out / ".search-index" / "pairs").mkdir(parents=True)
    (out / ".search-index" / "pairs" / "key.arrow").symlink_to("/dev/full")
    with pytest.raises(AuditInputError, match=r"could not write or read its working files under .*\.search-index.*free disk"):
        run_audit(AuditConfig(scores=scores, out=out, keywords=KEYWORDS))
    assert not (out / ".search-index").exists()
    (out / ".search-index" / "pairs").mkdir(parents=True)
    (out / ".search-index" / "pairs" / "key.arrow").symlink_to("/dev/full")
    (tmp_path / "kw.json").write_text(json.dumps(KEYWORDS))
    result = CliRunner().invoke(app, ["audit", str(scores), "--out", str(out), "--keywords", str(tmp_path / "kw.json")],
                                env={"CLIPGUARD_CONSOLE_WIDTH": "400", "HF_HUB_OFFLINE": "1"}, catch_exceptions=False)
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "No space left on device" in said and "choose another --out" in said
    assert "Traceback" not in said
