from pathlib import Path

import pytest

from clipguard.data.shardspec import resolve_shards
from clipguard.errors import ShardSpecError
from conftest import simple_samples, write_shard


def test_folder_glob_and_brace_resolve_in_order(tmp_path: Path):
    for i in range(3):
        write_shard(tmp_path / f"{i:05d}.tar", simple_samples(i, 1))
    by_folder = [s.url for s in resolve_shards([str(tmp_path)])]
    by_glob = [s.url for s in resolve_shards([str(tmp_path / "*.tar")])]
    by_brace = [s.url for s in resolve_shards([str(tmp_path / "{00000..00002}.tar")])]
    assert by_folder == by_glob == by_brace
    assert [Path(u).name for u in by_folder] == ["00000.tar", "00001.tar", "00002.tar"]


def test_img2dataset_folder_ignores_its_parquet_and_stats(tmp_path: Path):
    write_shard(tmp_path / "00000.tar", simple_samples(0, 1))
    (tmp_path / "00000.parquet").write_bytes(b"not a shard")
    (tmp_path / "00000_stats.json").write_text("{}")
    assert [s.name for s in resolve_shards(str(tmp_path))] == ["00000"]


def test_missing_path_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ShardSpecError, match="does not exist"):
        resolve_shards([str(tmp_path / "nope.tar")])
    with pytest.raises(ShardSpecError, match="matches no file"):
        resolve_shards([str(tmp_path / "*.tar")])


def test_pipe_urls_refused_unless_allowed():
    with pytest.raises(ShardSpecError, match="--allow-pipe"):
        resolve_shards(["pipe:cat /etc/passwd"])
    assert resolve_shards(["pipe:cat a.tar"], allow_pipe=True)[0].url == "pipe:cat a.tar"


def test_same_stem_in_two_folders_gets_distinct_names(tmp_path: Path):
    write_shard(tmp_path / "a" / "00000.tar", simple_samples(0, 1))
    write_shard(tmp_path / "b" / "00000.tar", simple_samples(0, 1))
    names = [s.name for s in resolve_shards([str(tmp_path / "a"), str(tmp_path / "b")])]
    assert len(set(names)) == 2 and all(n.startswith("00000-") for n in names)


def test_urls_expand_braces_without_touching_network():
    shards = resolve_shards(["https://example.org/data/{000..002}.tar"])
    assert [s.name for s in shards] == ["000", "001", "002"]
    assert all(s.is_remote for s in shards)
