"""`clipguard filter` on real tar shards scored by a real tiny open_clip model.

Every input pair must land in exactly one output, with its members unchanged; flagged means
cosine distance >= gamma; reruns skip finished shards and give byte-identical outputs.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import webdataset as wds
from typer.testing import CliRunner

from clipguard.cli.main import app
from clipguard.data.shardspec import resolve_shards
from clipguard.data.tarstream import split_key
from clipguard.data.writer import ShardSequenceWriter
from clipguard.model.loading import ModelSpec, load_model
from clipguard.scoring.run import ScoreConfig, score_shards
from clipguard.scoring.scorefiles import read_scores
from conftest import jpeg_bytes, write_shard

runner = CliRunner()

Members = list[tuple[str, bytes]]


@dataclass
class Dataset:
    shards: Path
    scores: Path
    inputs: dict[str, list[tuple[str, Members]]]  # shard -> samples (key, members) in tar order
    distances: dict[str, list[float | None]]  # shard -> distance per row, None for error rows
    gamma: float
    model: Path


def _sample(key: str, **members: bytes | str) -> dict:
    return {"__key__": key, **{ext.replace("_", "."): v for ext, v in members.items()}}


def _input_samples() -> dict[str, list[dict]]:
    first = [
        _sample(
            f"a{i:03d}",
            jpg=jpeg_bytes(10 + i, size=40),
            txt=f"a photo of object {i}",
            json=json.dumps({"url": f"http://example.com/{i}.jpg", "width": 40}),
            xyz=bytes(range(i, i + 17)),  # an extension no reader knows
        )
        for i in range(5)
    ]
    first.append(_sample("a005", jpg=jpeg_bytes(15, size=40), txt="a striped thing", seg_png=b"\x89PNG not decoded"))
    first.append(_sample("a006", jpg=b"\xff\xd8\xff this is not a jpeg", txt="a corrupt picture"))
    first.append(_sample("a007", jpg=jpeg_bytes(17, size=40), json=json.dumps({"url": "no caption here"})))
    second = [
        _sample("b000", jpg=jpeg_bytes(20, size=40), txt="first of a repeated key"),
        _sample("b001", jpg=jpeg_bytes(21, size=40), txt="in between", cls=b"7"),
        _sample("b000", jpg=jpeg_bytes(22, size=40), txt="second of a repeated key"),
        _sample("b002", jpg=jpeg_bytes(23, size=40), txt="last one"),
    ]
    return {"00000": first, "00001": second}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_checkpoint) -> Dataset:
    root = tmp_path_factory.mktemp("filter-data")
    raw = _input_samples()
    for name, samples in raw.items():
        write_shard(root / "shards" / f"{name}.tar", samples)
    loaded = load_model(ModelSpec(str(tiny_checkpoint)))
    score_shards(resolve_shards(str(root / "shards")), loaded, root / "scores", ScoreConfig(batch_size=8))
    table = read_scores(root / "scores")
    distances: dict[str, list[float | None]] = {name: [] for name in raw}
    for shard, d, status in zip(table.shard, table.cosine_distance, table.status):
        distances[shard].append(float(d) if status == "ok" else None)
    ok = sorted(d for ds in distances.values() for d in ds if d is not None)
    return Dataset(
        shards=root / "shards",
        scores=root / "scores",
        inputs={name: read_tar(root / "shards" / f"{name}.tar") for name in raw},
        distances=distances,
        gamma=ok[-3],  # exactly three pairs flagged, one of them at distance == gamma
        model=tiny_checkpoint,
    )


def _filter(dataset: Dataset, out: Path, *extra: str, gamma: float | None = None):
    args = [
        "filter", str(dataset.shards), "--out", str(out / "clean"), "--quarantine", str(out / "quarantine"),
        "--model", str(dataset.model), "--workers", "0", "--batch-size", "8", *extra,
    ]
    if "--calibration" not in extra:
        args += ["--gamma", repr(dataset.gamma if gamma is None else gamma)]
    return runner.invoke(app, args)


def said(result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def read_tar(path: Path) -> list[tuple[str, Members]]:
    """Samples of a tar in order, members as (ext, bytes); consecutive members of one key group."""
    samples: list[tuple[str, Members]] = []
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            key, ext = split_key(member.name)
            if not samples or samples[-1][0] != key:
                samples.append((key, []))
            samples[-1][1].append((ext, archive.extractfile(member).read()))
    return samples


def outputs(folder: Path, shard: str, kind: str) -> list[tuple[str, Members]]:
    return [s for part in sorted(folder.glob(f"{shard}-{kind}-*.tar")) for s in read_tar(part)]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_pair_lands_once_with_its_members_unchanged(tmp_path, dataset):
    result = _filter(dataset, tmp_path, "--scores", str(dataset.scores), "--shard-size", "3")
    assert result.exit_code == 0, result.output
    clean_dir, quarantine_dir = tmp_path / "clean", tmp_path / "quarantine"

    all_in, all_out = Counter(), Counter()
    for shard, samples in dataset.inputs.items():
        verdicts = [
            "errored" if d is None else "flagged" if d >= dataset.gamma else "kept" for d in dataset.distances[shard]
        ]
        kept = outputs(clean_dir, shard, "clean")
        quarantined = outputs(quarantine_dir, shard, "quarantine")
        # Kept samples: identical key, member names, order and bytes, in input order.
        assert kept == [s for s, v in zip(samples, verdicts) if v == "kept"]
        expected_quarantine = [s for s, v in zip(samples, verdicts) if v != "kept"]
        assert [(key, members[:-1]) for key, members in quarantined] == expected_quarantine
        for (key, members), verdict in zip(quarantined, [v for v in verdicts if v != "kept"]):
            ext, sidecar_bytes = members[-1]
            assert ext == "clipguard.json"
            sidecar = json.loads(sidecar_bytes)
            assert sidecar["source_shard"] == shard and sidecar["key"] == key and sidecar["gamma"] == dataset.gamma
            assert sidecar["reason"].startswith("flagged: distance" if verdict == "flagged" else "error: ")
            if verdict == "flagged":
                assert sidecar["distance"] >= dataset.gamma
        all_in.update(key for key, _ in samples)
        all_out.update(key for key, _ in kept + quarantined)
    assert all_in == all_out  # b000 appears twice in and twice out

    reasons = {
        json.loads(members[-1][1])["key"]: json.loads(members[-1][1])["reason"]
        for key, members in outputs(quarantine_dir, "00000", "quarantine")
    }
    assert reasons["a006"].startswith("error: corrupt_image")
    assert reasons["a007"] == "error: missing_caption"
    flagged = [d for ds in dataset.distances.values() for d in ds if d is not None and d >= dataset.gamma]
    assert len(flagged) == 3 and min(flagged) == dataset.gamma  # equal to gamma is flagged

    manifest = json.loads((clean_dir / "filter_manifest.json").read_text())
    assert manifest["complete"] and manifest["gamma"] == dataset.gamma and manifest["gamma_source"] == "--gamma"
    assert manifest["flag_rule"] == "cosine_distance >= gamma"
    assert manifest["totals"] == {"read": 12, "kept": 7, "flagged": 3, "errored": 2, "quarantined": 5}
    for entry in manifest["inputs"]:
        assert entry["read"] == entry["kept"] + entry["flagged"] + entry["errored"] == len(dataset.inputs[entry["shard"]])
        assert entry["scores"] == "reused"
    for kind, folder in (("clean", clean_dir), ("quarantine", quarantine_dir)):
        for part in manifest["outputs"][kind]:
            path = folder / part["file"]
            assert sha256(path) == part["sha256"] and path.stat().st_size == part["bytes"]
            assert 1 <= part["samples"] == len(read_tar(path)) <= 3
    assert json.loads((quarantine_dir / "filter_manifest.json").read_text()) == manifest
    listed = {p["file"] for p in manifest["outputs"]["clean"]}
    assert listed == {p.name for p in clean_dir.glob("*.tar")}
    assert not list(tmp_path.rglob("*.tmp"))
    assert "00000-clean-000000.tar" in listed


def test_clean_shards_read_back_with_webdataset(tmp_path, dataset):
    assert _filter(dataset, tmp_path, "--scores", str(dataset.scores)).exit_code == 0
    urls = sorted(str(p) for p in (tmp_path / "clean").glob("*.tar"))
    loaded = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(loaded) == 7
    inputs = [(key, dict(members)) for samples in dataset.inputs.values() for key, members in samples]
    for sample in loaded:
        fields = {k: v for k, v in sample.items() if not k.startswith("__")}
        assert (sample["__key__"], fields) in inputs


def test_rerun_skips_finished_shards_and_gives_identical_bytes(tmp_path, dataset):
    args = ("--scores", str(dataset.scores), "--shard-size", "2")
    assert _filter(dataset, tmp_path / "one", *args).exit_code == 0
    clean, quarantine = tmp_path / "one" / "clean", tmp_path / "one" / "quarantine"
    before = {p.name: sha256(p) for p in [*clean.glob("*.tar"), *quarantine.glob("*.tar")]}
    finished_mtime = (clean / "00000-clean-000000.tar").stat().st_mtime_ns
    # Simulate a run killed inside shard 00001: its record and one part are gone, a temporary remains.
    (clean / "00001.filter.json").unlink()
    sorted([*clean.glob("00001-*.tar"), *quarantine.glob("00001-*.tar")])[0].unlink()
    (clean / "00001-clean-000001.tar.tmp").write_bytes(b"half written")

    rerun = _filter(dataset, tmp_path / "one", *args)
    assert rerun.exit_code == 0, rerun.output
    assert "1 already done" in said(rerun)
    after = {p.name: sha256(p) for p in [*clean.glob("*.tar"), *quarantine.glob("*.tar")]}
    assert after == before
    assert (clean / "00000-clean-000000.tar").stat().st_mtime_ns == finished_mtime
    assert not list(clean.glob("*.tmp"))
    manifest = json.loads((clean / "filter_manifest.json").read_text())
    assert [e["skipped_on_resume"] for e in manifest["inputs"]] == [True, False]

    assert _filter(dataset, tmp_path / "two", *args).exit_code == 0
    fresh = {p.name: sha256(p) for p in [*(tmp_path / "two" / "clean").glob("*.tar"), *(tmp_path / "two" / "quarantine").glob("*.tar")]}
    assert fresh == before


def test_rerun_with_another_gamma_into_the_same_folder_is_refused(tmp_path, dataset):
    assert _filter(dataset, tmp_path, "--scores", str(dataset.scores)).exit_code == 0
    again = _filter(dataset, tmp_path, "--scores", str(dataset.scores), gamma=dataset.gamma + 0.01)
    assert again.exit_code == 2 and "different gamma" in said(again)


def test_scores_from_another_model_are_refused(tmp_path, dataset):
    args = [
        "filter", str(dataset.shards), "--gamma", "0.9", "--out", str(tmp_path / "c"), "--quarantine", str(tmp_path / "q"),
        "--scores", str(dataset.scores), "--model", "clipguard-tiny-victim", "--pretrained", "none", "--workers", "0",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "different model" in said(result) and "random weights" in said(result)
    assert not list((tmp_path / "c").glob("*.tar"))


def test_scores_computed_on_the_fly_match_reused_ones(tmp_path, dataset):
    fresh = _filter(dataset, tmp_path / "fresh")
    assert fresh.exit_code == 0, fresh.output
    assert sorted(p.name for p in (tmp_path / "fresh" / "clean" / "scores").glob("*.parquet")) == ["00000.parquet", "00001.parquet"]
    assert _filter(dataset, tmp_path / "reused", "--scores", str(dataset.scores)).exit_code == 0
    for kind in ("clean", "quarantine"):
        assert {p.name: sha256(p) for p in (tmp_path / "fresh" / kind).glob("*.tar")} == {
            p.name: sha256(p) for p in (tmp_path / "reused" / kind).glob("*.tar")
        }
    manifest = json.loads((tmp_path / "fresh" / "clean" / "filter_manifest.json").read_text())
    assert [e["scores"] for e in manifest["inputs"]] == ["scored", "scored"]


def test_scores_of_a_changed_shard_are_refused(tmp_path, dataset):
    changed = tmp_path / "changed"
    samples = _input_samples()
    samples["00001"][3]["jpg"] = jpeg_bytes(99, size=40)  # same keys, another image
    for name, items in samples.items():
        write_shard(changed / f"{name}.tar", items)
    args = [
        "filter", str(changed), "--gamma", "0.5", "--out", str(tmp_path / "c"), "--quarantine", str(tmp_path / "q"),
        "--scores", str(dataset.scores), "--model", str(dataset.model), "--workers", "0",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "do not match shard 00001" in said(result)
    assert not list((tmp_path / "c").glob("00001-*")) and not list(tmp_path.rglob("*.tmp"))


def test_calibration_file_gives_gamma_and_must_name_the_same_model(tmp_path, dataset):
    scores_manifest = json.loads((dataset.scores / "manifest.json").read_text())
    good = tmp_path / "calibration.json"
    good.write_text(json.dumps({"gamma": dataset.gamma, "fingerprint": scores_manifest["fingerprint"]}))
    result = _filter(dataset, tmp_path / "ok", "--scores", str(dataset.scores), "--calibration", str(good))
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "ok" / "clean" / "filter_manifest.json").read_text())
    assert manifest["gamma"] == dataset.gamma and manifest["gamma_source"].startswith("calibration ")
    assert manifest["threshold"]["calibration_sha256"] == sha256(good)

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"gamma": 0.8, "fingerprint": {**scores_manifest["fingerprint"], "weights_sha256": "0" * 64}}))
    refused = _filter(dataset, tmp_path / "no", "--calibration", str(other))
    assert refused.exit_code == 2 and "does not transfer" in said(refused)

    both = _filter(dataset, tmp_path / "both", "--calibration", str(good), "--gamma", "0.8")
    assert both.exit_code == 2 and "exactly one" in said(both)


def _raw_tar(path: Path, members: list[tuple[str, bytes]], cut: int = 0) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) - cut] if cut else data)
    return path


def test_unsafe_and_truncated_samples_go_to_quarantine_under_safe_names(tmp_path, dataset):
    secret = b"bytes that must never be written under their own name"
    _raw_tar(tmp_path / "in" / "evil.tar", [
        ("ok0.jpg", jpeg_bytes(1, size=40)), ("ok0.txt", b"a fine pair"),
        ("../escape.jpg", secret), ("../escape.txt", secret),
        ("ok1.jpg", jpeg_bytes(2, size=40)), ("ok1.txt", b"another fine pair"),
    ])
    big = jpeg_bytes(3, size=200)
    _raw_tar(tmp_path / "in" / "cut.tar", [
        ("c0.jpg", jpeg_bytes(4, size=40)), ("c0.txt", b"whole"), ("c1.txt", b"cut short"), ("c1.jpg", big),
    ], cut=10240 + len(big) // 2)
    args = [
        "filter", str(tmp_path / "in"), "--gamma", "2", "--out", str(tmp_path / "c"), "--quarantine", str(tmp_path / "q"),
        "--model", str(dataset.model), "--workers", "0",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    quarantined = {json.loads(m[-1][1])["key"]: (key, m) for key, m in outputs(tmp_path / "q", "evil", "quarantine")}
    key, members = quarantined["../escape"]
    # The bytes are kept (nothing is lost) under a stand-in name; the sidecar maps it back.
    assert key.startswith("unsafe-") and members[:2] == [("jpg", secret), ("txt", secret)]
    sidecar = json.loads(members[-1][1])
    assert "unsafe_member" in sidecar["reason"]
    assert sidecar["renamed_members"] == [
        {"member": "../escape.jpg", "written_as": f"{key}.jpg", "reason": "member name with '..'"},
        {"member": "../escape.txt", "written_as": f"{key}.txt", "reason": "member name with '..'"},
    ]
    assert [k for k, _ in outputs(tmp_path / "c", "evil", "clean")] == ["ok0", "ok1"]
    for part in (tmp_path / "c").glob("*.tar"):
        assert secret not in part.read_bytes()
    for part in [*(tmp_path / "c").glob("*.tar"), *(tmp_path / "q").glob("*.tar")]:
        with tarfile.open(part) as archive:
            assert all(not m.name.startswith(("/", "..")) for m in archive.getmembers())

    assert [k for k, _ in outputs(tmp_path / "c", "cut", "clean")] == ["c0"]
    (cut_key, cut_members), = outputs(tmp_path / "q", "cut", "quarantine")
    assert cut_key == "c1" and cut_members[0] == ("txt", b"cut short")
    assert json.loads(cut_members[-1][1])["reason"].startswith("error: truncated_shard")
    manifest = json.loads((tmp_path / "c" / "filter_manifest.json").read_text())
    assert manifest["truncated_shards"] == ["cut"]
    assert manifest["totals"]["read"] == manifest["totals"]["kept"] + manifest["totals"]["quarantined"] == 5


def test_outputs_may_not_share_a_folder_with_inputs_or_each_other(tmp_path, dataset):
    same = runner.invoke(app, ["filter", str(dataset.shards), "--gamma", "1", "--out", str(tmp_path), "--quarantine", str(tmp_path)])
    assert same.exit_code == 2 and "must be different" in said(same)
    inside = runner.invoke(app, [
        "filter", str(dataset.shards), "--gamma", "1", "--out", str(dataset.shards), "--quarantine", str(tmp_path / "q"),
        "--model", str(dataset.model),
    ])
    assert inside.exit_code == 2 and "holds input shards" in said(inside)
    assert _filter(dataset, tmp_path / "first", "--scores", str(dataset.scores)).exit_code == 0
    shared = runner.invoke(app, [
        "filter", str(dataset.shards), "--gamma", "1", "--out", str(tmp_path / "second"),
        "--quarantine", str(tmp_path / "first" / "quarantine"), "--model", str(dataset.model),
    ])
    assert shared.exit_code == 2 and "holds the quarantine of the run writing to" in said(shared)


def test_writer_is_deterministic_and_never_merges_repeated_keys(tmp_path):
    def write(folder: Path):
        writer = ShardSequenceWriter(folder, "s-clean", max_samples=3)
        for key in ["k1", "k2", "k2", "k3", "k4", "k5", "k6"]:
            writer.write(key, [(f"{key}.jpg", key.encode() * 3), (f"{key}.txt", b"caption")])
        return writer.commit()

    first, second = write(tmp_path / "a"), write(tmp_path / "b")
    # k2 twice in a row would read back as one sample, so the second k2 starts a new part.
    assert [p.samples for p in first] == [2, 3, 2]
    assert [p.sha256 for p in first] == [p.sha256 for p in second] == [sha256(p.path) for p in second]
    assert [k for p in first for k, _ in read_tar(p.path)] == ["k1", "k2", "k2", "k3", "k4", "k5", "k6"]
    with tarfile.open(first[0].path) as archive:
        info = archive.getmembers()[0]
        assert (info.mtime, info.uid, info.uname, info.mode) == (946_684_800, 0, "clipguard", 0o444)

    aborted = ShardSequenceWriter(tmp_path / "c", "s-clean", max_samples=1)
    aborted.write("x", [("x.txt", b"1")])
    aborted.write("y", [("y.txt", b"2")])
    aborted.abort()
    assert list((tmp_path / "c").iterdir()) == []
    with pytest.raises(ValueError):
        ShardSequenceWriter(tmp_path / "d", "s", 5).write("../up", [("../up.txt", b"no")])
    with pytest.raises(ValueError):
        ShardSequenceWriter(tmp_path / "d", "s", 5).write("up", [("..\\..\\up.txt", b"no")])


def test_an_unreadable_shard_fails_the_run_but_not_the_others(tmp_path, dataset):
    folder = tmp_path / "in"
    write_shard(folder / "good.tar", [{"__key__": "g0", "jpg": jpeg_bytes(5, size=40), "txt": "fine"}])
    (folder / "junk.tar").write_bytes(b"not a tar archive, whatever the name says " * 30)
    args = [
        "filter", str(folder), "--gamma", "2", "--out", str(tmp_path / "c"), "--quarantine", str(tmp_path / "q"),
        "--model", str(dataset.model), "--workers", "0",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "1 shard(s) could not be read (junk)" in said(result)
    assert [k for k, _ in outputs(tmp_path / "c", "good", "clean")] == ["g0"]
    assert not (tmp_path / "c" / "junk.filter.json").exists()  # so that a rerun tries it again
    manifest = json.loads((tmp_path / "c" / "filter_manifest.json").read_text())
    assert manifest["complete"] is False and manifest["unreadable_shards"] == ["junk"]
