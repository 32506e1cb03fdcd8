"""Source metadata without img2dataset: the subset file's format and refusals, the stats-only sidecar."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipguard.data.shardspec import Shard
from clipguard.data.sourcemeta import meta_from_json, read_sidecar
from clipguard.errors import ClipguardError
from clipguard.filtering.keeplist import subset_array


def test_subset_is_sorted_unique_high_low_uint64_pairs():
    uids = ["ffffffffffffffff0000000000000001", "0000000000000001FFFFFFFFFFFFFFFF", "ffffffffffffffff0000000000000001"]
    array = subset_array(uids)
    assert array.dtype == np.dtype("u8,u8")
    assert array.tolist() == [(1, 2**64 - 1), (2**64 - 1, 1)]


@pytest.mark.parametrize("bad", [None, "abc", "g" * 32])
def test_subset_refuses_a_kept_pair_without_a_128_bit_uid(bad):
    with pytest.raises(ClipguardError, match="no 128-bit uid"):
        subset_array(["0" * 32, bad])


def test_metadata_from_json_and_stats_only_sidecar(tmp_path):
    meta = meta_from_json(json.dumps({"uid": "u1", "url": "http://x/1.jpg", "status": "success", "error_message": None}).encode())
    assert (meta.uid, meta.url, meta.source_status, meta.source_error) == ("u1", "http://x/1.jpg", "success", None)
    assert meta_from_json(b"{not json") == meta_from_json(None)
    (tmp_path / "00000.tar").write_bytes(b"")
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 10, "successes": 7, "failed_to_download": 3, "failed_to_resize": 0}))
    report = read_sidecar(Shard(url=str(tmp_path / "00000.tar"), name="00000")).report
    assert (report.attempted, report.succeeded, report.failed, report.failed_by_status) == (10, 7, 3, {"failed_to_download": 3})


def test_sample_csv_carries_the_uid_and_url_scoring_took_from_the_img2dataset_parquet(tmp_path, tiny_loaded):
    """The sample's json has neither; only the shard's img2dataset parquet does, and scoring read it."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipguard.api import sample
    from clipguard.data.shardspec import resolve_shards
    from clipguard.scoring.run import ScoreConfig, score_shards
    from conftest import simple_samples, write_shard

    shard = write_shard(tmp_path / "shards" / "00000.tar", simple_samples(0, 6))
    keys = [f"{0:05d}{i:04d}" for i in range(6)]
    pq.write_table(pa.table({
        "key": keys, "uid": [f"{i:032x}" for i in range(6)], "url": [f"http://img.test/{i}.jpg" for i in range(6)],
        "status": ["success"] * 6, "error_message": [None] * 6,
    }), shard.with_suffix(".parquet"))
    score_shards(resolve_shards(str(shard)), tiny_loaded, tmp_path / "scores", ScoreConfig())
    sample(tmp_path / "scores", tmp_path / "label", n=6)
    with open(tmp_path / "label" / "sample.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(line for line in handle if not line.startswith("#"))]
    assert sorted((r["key"], r["uid"], r["url"]) for r in rows) == [
        (k, f"{i:032x}", f"http://img.test/{i}.jpg") for i, k in enumerate(keys)
    ]
