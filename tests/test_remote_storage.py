"""Shards on an object store and output folders there, against a real S3 server on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipguard.data.shardspec import Shard, resolve_shards
from clipguard.data.storage import OutputFolder
from clipguard.data.tarstream import ShardReport, iter_samples
from clipguard.errors import ShardSpecError, StorageError
from clipguard.scoring.run import ScoreConfig, score_shards
from clipguard.scoring.scorefiles import read_scores
from conftest import simple_samples, write_shard
from s3_server import s3_server  # noqa: F401 - the fixture

SHARDS = 3
BIG = 80  # samples in the shard that the cutting proxy serves


@pytest.fixture(scope="module")
def s3_shards(s3_server, tmp_path_factory):  # noqa: F811
    """Three real shards in a local folder and the same bytes under s3://shards/run/."""
    local = tmp_path_factory.mktemp("local-shards")
    bucket = s3_server.bucket("shards")
    for s in range(SHARDS):
        path = write_shard(local / f"{s:05d}.tar", simple_samples(s, 12))
        s3_server.upload(path, f"{bucket}/run/{path.name}")
    # A folder is its .tar objects: an img2dataset parquet beside them is not a shard.
    s3_server.fs.pipe_file("shards/run/00000.parquet", b"not a shard")
    return local, f"{bucket}/run"


def distances(folder: Path) -> dict[tuple[str, str], float]:
    table = read_scores(folder)
    return {(s, k): d for s, k, d in zip(table.shard, table.key, table.cosine_distance)}


def test_folder_glob_and_brace_resolve_to_the_same_sorted_objects(s3_shards):
    _, run = s3_shards
    expected = [f"{run}/{s:05d}.tar" for s in range(SHARDS)]
    for spec in (f"{run}/", run, f"{run}/*.tar", f"{run}/{{00000..00002}}.tar"):
        shards = resolve_shards(spec)
        assert [s.url for s in shards] == expected, spec
    assert [s.name for s in shards] == ["00000", "00001", "00002"]
    assert all(s.is_remote and not s.is_local and s.location == s.url for s in shards)
    assert shards[0].local_stat() is None


def test_file_urls_stay_local_paths(s3_shards):
    local, _ = s3_shards
    shards = resolve_shards(f"file://{local}")
    assert [Path(s.url).name for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert all(s.is_local and not s.is_remote for s in shards)


def test_missing_objects_prefixes_and_patterns_are_spec_errors(s3_shards):
    _, run = s3_shards
    with pytest.raises(ShardSpecError, match=r"s3://shards/run/00009.tar does not exist"):
        resolve_shards(f"{run}/{{00000..00002}}.tar {run}/00009.tar".split())
    with pytest.raises(ShardSpecError, match="folder s3://shards/nothing-here/ does not exist"):
        resolve_shards("s3://shards/nothing-here/")
    with pytest.raises(ShardSpecError, match="matches no object"):
        resolve_shards(f"{run}/*.tgz")
    with pytest.raises(ShardSpecError, match="does not exist"):
        resolve_shards("s3://no-such-bucket/00000.tar")


def test_a_long_brace_list_is_checked_with_one_listing(s3_server, tmp_path):  # noqa: F811
    bucket = s3_server.bucket("many")
    for i in range(20):
        s3_server.fs.pipe_file(f"many/{i:05d}.tar", b"")
    assert len(resolve_shards(f"{bucket}/{{00000..00019}}.tar")) == 20
    with pytest.raises(ShardSpecError, match=r"s3://many/00020.tar does not exist"):
        resolve_shards(f"{bucket}/{{00000..00020}}.tar")


def test_scores_from_s3_equal_scores_of_the_same_local_shards(s3_shards, tiny_loaded, tmp_path):
    local, run = s3_shards
    config = ScoreConfig(batch_size=8, workers=2)  # decode workers are forked: s3 clients must survive it
    remote_summary = score_shards(resolve_shards(f"{run}/"), tiny_loaded, tmp_path / "remote", config)
    local_summary = score_shards(resolve_shards(str(local)), tiny_loaded, tmp_path / "local", config)
    assert remote_summary.pairs == local_summary.pairs == SHARDS * 12
    assert remote_summary.ok == SHARDS * 12
    assert distances(tmp_path / "remote") == distances(tmp_path / "local")


def test_a_missing_object_is_a_failed_shard_that_says_so(s3_shards):
    _, run = s3_shards
    shard = Shard(url=f"{run}/00042.tar", name="00042")
    report = ShardReport(shard=shard.name, url=shard.url)
    assert list(iter_samples(shard, report)) == []
    assert report.source_failed and report.failed
    assert "s3://shards/run/00042.tar does not exist" in report.read_error


def test_reading_an_object_gives_every_sample(s3_shards):
    _, run = s3_shards
    shard = resolve_shards(f"{run}/00001.tar")[0]
    report = ShardReport(shard=shard.name, url=shard.url)
    keys = [sample.key for sample in iter_samples(shard, report)]
    assert keys == [f"00001{i:04d}" for i in range(12)]
    assert not report.failed and not report.truncated and report.read_error is None


def test_bad_credentials_say_what_to_check(s3_server, s3_shards, tmp_path):  # noqa: F811
    _, run = s3_shards
    with s3_server.require_auth():
        with pytest.raises(ShardSpecError, match="access denied.*AWS_ACCESS_KEY_ID"):
            resolve_shards(f"{run}/")
        shard = Shard(url=f"{run}/00000.tar", name="00000")
        report = ShardReport(shard=shard.name, url=shard.url)
        assert list(iter_samples(shard, report)) == []
        assert report.source_failed and "access denied" in report.read_error
        with pytest.raises(StorageError, match="access denied"):
            OutputFolder.at("s3://shards/out").write_bytes("manifest.json", b"{}")


def exercise(folder: OutputFolder) -> None:
    """The whole OutputFolder contract, the same for every kind of folder."""
    assert folder.list() == [] and not folder.exists("00000.parquet")
    staged = folder.staging / "00000.parquet"
    staged.with_name("00000.parquet.tmp").write_bytes(b"PAR1 scores")
    staged.with_name("00000.parquet.tmp").replace(staged)
    folder.publish("00000.parquet")
    folder.write_bytes("00000_stats.json", b'{"ok": 1}')
    folder.write_bytes("00000_stats.json", b'{"ok": 2}')  # rewritten whole
    assert folder.exists("00000.parquet") and folder.exists("00000_stats.json")
    assert folder.list() == ["00000.parquet", "00000_stats.json"]
    assert folder.list(".json") == ["00000_stats.json"]
    assert folder.read_bytes("00000_stats.json") == b'{"ok": 2}'
    assert folder.fetch("00000.parquet").read_bytes() == b"PAR1 scores"
    with pytest.raises(FileNotFoundError):
        folder.read_bytes("00001_stats.json")
    with pytest.raises(FileNotFoundError):
        folder.publish("never-written.parquet")
    folder.remove("00000_stats.json")
    folder.remove("00000_stats.json")  # already gone: not an error
    assert folder.list() == ["00000.parquet"]


def test_output_folder_round_trip_locally(tmp_path):
    folder = OutputFolder.at(tmp_path / "scores")
    assert folder.is_local and folder.location == str(tmp_path / "scores")
    assert folder.staging == tmp_path / "scores"
    exercise(folder)
    assert sorted(p.name for p in (tmp_path / "scores").iterdir()) == ["00000.parquet"]  # no temp files left
    assert OutputFolder.at(f"file://{tmp_path}/scores").list() == ["00000.parquet"]


def test_output_folder_round_trip_on_s3(s3_server):  # noqa: F811
    s3_server.bucket("outputs")
    folder = OutputFolder.at("s3://outputs/run-1/")
    assert not folder.is_local and folder.location == "s3://outputs/run-1"
    exercise(folder)
    assert s3_server.fs.ls("outputs/run-1") == ["outputs/run-1/00000.parquet"]
    # A second worker (another process, another machine) sees what the first one published.
    other = OutputFolder.at("s3://outputs/run-1")
    other.write_bytes("00001_stats.json", b"{}")
    assert folder.list(".json") == ["00001_stats.json"] and folder.exists("00001_stats.json")


def test_output_folders_refuse_what_they_cannot_be():
    with pytest.raises(StorageError, match="cannot be written"):
        OutputFolder.at("https://example.org/scores")
    with pytest.raises(StorageError, match="not installed|not known"):
        OutputFolder.at("nosuchscheme://bucket/scores")


@pytest.fixture
def cut_connections(s3_server, monkeypatch):  # noqa: F811
    """S3 clients talk through a CuttingProxy; s3fs's own retries are off, so what recovers a
    cut read is clipguard's reopen-at-the-byte-reached, not the backend."""
    import s3fs

    from cutting_proxy import CuttingProxy

    proxies = []

    def through(cut_after: int, cuts: float) -> CuttingProxy:
        host, port = s3_server.endpoint.removeprefix("http://").split(":")
        proxy = CuttingProxy(host, int(port), cut_after, cuts)
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
        s3fs.S3FileSystem.clear_instance_cache()
        return proxy

    yield through
    s3fs.S3FileSystem.clear_instance_cache()  # the next test must not reuse a client of the proxy
    for proxy in proxies:
        proxy.close()


@pytest.fixture(scope="module")
def big_shard(s3_server, tmp_path_factory):  # noqa: F811
    """A shard of most of a MB, so that cuts land after several 64 KiB blocks have been read."""
    path = write_shard(tmp_path_factory.mktemp("big") / "00007.tar", simple_samples(7, BIG))
    url = f"{s3_server.bucket('big')}/00007.tar"
    s3_server.upload(path, url)
    return path, url


def test_a_cut_connection_is_resumed_at_the_byte_reached(big_shard, cut_connections, monkeypatch):
    from clipguard.data import sources

    path, url = big_shard
    assert path.stat().st_size > 600_000
    monkeypatch.setattr(sources, "FSSPEC_BLOCK_BYTES", 64 << 10)  # several blocks in a small shard
    proxy = cut_connections(cut_after=150_000, cuts=1)
    with sources.open_source(url, is_remote=True) as stream:
        assert stream.read() == path.read_bytes()
    assert proxy.cuts_made == 1
    assert any(start > 0 for start in proxy.ranges), proxy.ranges  # a ranged GET, not a reread


def test_a_store_that_keeps_cutting_is_a_failed_shard_after_the_retries(big_shard, cut_connections, monkeypatch):
    from clipguard.data import sources

    _, url = big_shard
    monkeypatch.setattr(sources, "FSSPEC_BLOCK_BYTES", 64 << 10)
    # s3fs asks for two blocks at a time (128 KiB); every second request is cut, so each try gets
    # a little further and the fourth cut ends the read: 4 x 128 KiB in, most of the shard not.
    cut_connections(cut_after=150_000, cuts=float("inf"))
    shard = Shard(url=url, name="00007")
    report = ShardReport(shard=shard.name, url=shard.url)
    samples = list(iter_samples(shard, report))
    assert report.source_failed and report.failed
    assert "gave up after 4 tries" in report.read_error
    # What was read before the last try is yielded; the sample cut in half says so.
    assert 0 < len(samples) < BIG
    assert all(not s.problems for s in samples[:-1]) and "source_read_failed" in samples[-1].problems


def test_cli_scores_an_s3_folder_and_names_what_is_wrong(s3_server, s3_shards, tiny_checkpoint, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from clipguard.cli.main import app

    _, run = s3_shards
    runner = CliRunner()
    model = ["--model", str(tiny_checkpoint)]
    done = runner.invoke(app, ["score", f"{run}/", "--out", str(tmp_path / "scores"), *model])
    assert done.exit_code == 0, done.output
    assert len(read_scores(tmp_path / "scores").key) == SHARDS * 12
    missing = runner.invoke(app, ["score", f"{run}/00009.tar", "--out", str(tmp_path / "o1"), *model])
    assert missing.exit_code == 2 and "s3://shards/run/00009.tar does not exist" in missing.output
    with s3_server.require_auth():
        denied = runner.invoke(app, ["score", f"{run}/", "--out", str(tmp_path / "o2"), *model])
    assert denied.exit_code == 2 and "access denied" in denied.output and "AWS_ACCESS_KEY_ID" in denied.output


def test_object_store_reads_and_writes_retry_a_cut_connection(s3_server, cut_connections):  # noqa: F811
    s3_server.bucket("flaky")
    folder = OutputFolder.at("s3://flaky/out")
    payload = bytes(range(256)) * 1000  # 256 KB
    folder.write_bytes("big.bin", payload)
    proxy = cut_connections(cut_after=100_000, cuts=1)
    assert OutputFolder.at("s3://flaky/out").read_bytes("big.bin") == payload
    assert proxy.cuts_made == 1
    cut_connections(cut_after=100_000, cuts=float("inf"))
    with pytest.raises(StorageError, match="gave up after 4 tries"):
        OutputFolder.at("s3://flaky/out").read_bytes("big.bin")


def test_a_scheme_without_its_backend_names_the_package():
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(ShardSpecError, match="gs:// needs a package that is not installed: install gcsfs"):
        resolve_shards("gs://bucket/shards/")
    with pytest.raises(StorageError, match="install gcsfs"):
        OutputFolder.at("gs://bucket/scores")


def test_hf_urls_in_offline_mode_say_so_at_once(monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("CLIPGUARD_HTTP_BACKOFF", "5")  # a retry would make this test slow
    with pytest.raises(ShardSpecError, match="HF_HUB_OFFLINE"):
        resolve_shards("hf://datasets/clipguard/none/*.tar")


def test_scores_are_written_to_s3_and_a_rerun_resumes_there(s3_server, s3_shards, tiny_checkpoint, tmp_path):  # noqa: F811
    """Issue 14's round trip: shards from S3, scores to S3 (Parquet + stats + manifest), resume there."""
    from typer.testing import CliRunner

    from clipguard.cli.main import app
    from clipguard.scoring.stats import folder_summary

    local, prefix = s3_shards
    bucket = s3_server.bucket("scores")
    out = f"{bucket}/run1"
    runner = CliRunner()
    args = ["score", f"{prefix}/", "--out", out, "--model", str(tiny_checkpoint), "--workers", "0"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    folder = OutputFolder.at(out)
    names = folder.list()
    assert {f"{s:05d}.parquet" for s in range(SHARDS)} <= set(names) and "manifest.json" in names
    summary = folder_summary(folder)
    assert summary["complete"] and summary["pairs"] == 12 * SHARDS
    # The same scores as the same shards scored locally into a folder.
    local_out = tmp_path / "local"
    assert runner.invoke(app, ["score", str(local), "--out", str(local_out), "--model", str(tiny_checkpoint), "--workers", "0"]).exit_code == 0
    for s in range(SHARDS):
        assert folder.read_bytes(f"{s:05d}.parquet") != b""
        assert read_scores(folder.fetch(f"{s:05d}.parquet")).cosine_distance.tolist() == read_scores(local_out / f"{s:05d}.parquet").cosine_distance.tolist()
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and f"{SHARDS} already complete" in second.output


def test_filter_writes_clean_and_quarantine_shards_to_s3_and_resumes(s3_server, s3_shards, tiny_checkpoint, tmp_path):  # noqa: F811
    """Issue 14's round trip for filter: shards from S3, clean / quarantine shards and records to S3."""
    import json
    import tarfile

    from typer.testing import CliRunner

    from clipguard.cli.main import app

    local, prefix = s3_shards
    bucket = s3_server.bucket("filtered")
    runner = CliRunner()
    args = ["filter", f"{prefix}/", "--gamma", "0.5", "--out", f"{bucket}/clean", "--quarantine", f"{bucket}/quarantine",
            "--model", str(tiny_checkpoint), "--workers", "0", "--shard-size", "5"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    clean, quarantine = OutputFolder.at(f"{bucket}/clean"), OutputFolder.at(f"{bucket}/quarantine")
    manifest = json.loads(clean.read_bytes("filter_manifest.json"))
    assert manifest["complete"] and manifest["totals"]["read"] == 12 * SHARDS
    assert manifest["totals"]["read"] == manifest["totals"]["kept"] + manifest["totals"]["quarantined"]
    assert manifest["clean_dir"] == clean.location and json.loads(quarantine.read_bytes("filter_manifest.json")) == manifest
    samples = 0
    for kind, folder in (("clean", clean), ("quarantine", quarantine)):
        listed = {p["file"] for p in manifest["outputs"][kind]}
        assert listed == set(folder.list(".tar"))
        for name in listed:
            with tarfile.open(folder.fetch(name)) as archive:
                samples += len({m.name.split(".", 1)[0] for m in archive.getmembers() if not m.name.endswith(".clipguard.json")})
    assert samples == 12 * SHARDS
    assert {f"{s:05d}.parquet" for s in range(SHARDS)} <= set(OutputFolder.at(f"{bucket}/clean/scores").list())
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and f"{SHARDS} already done" in " ".join(second.output.split()), second.output
