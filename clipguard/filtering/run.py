"""`filter`: scores + gamma -> clean shards and quarantine shards; every input pair ends in one.

Each input shard is filtered on its own into ``<shard>-clean-NNNNNN.tar`` (in the clean folder)
and ``<shard>-quarantine-NNNNNN.tar`` (in the quarantine folder), at most ``shard_size`` samples
per part. Parts are written under temporary names and renamed when the whole input shard is
done; then ``<shard>.filter.json`` records the counts and the sha256 of every part. That record
is the completion marker: a rerun skips a shard whose record matches the settings and whose
parts are all present, and redoes any other. Keeping outputs per input shard is what makes this
simple: an output part never mixes samples of two input shards, so no part is ever half-owned
by a finished shard and half by an unfinished one.

``filter_manifest.json`` (in both folders) sums the records of this run's shards: counts per input
shard (read = kept + flagged + errored), every output part with its sample count and sha256,
gamma and where it came from, and the model fingerprint. Scores computed on the fly go to
``<clean>/scores/``, a normal score folder that later runs can pass as ``--scores``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import clipguard
from clipguard.data.folderlock import exclusive_folder
from clipguard.data.shardspec import Shard
from clipguard.data.storage import OutputFolder
from clipguard.data.tarstream import Member, ShardReport, printable_key, unsafe_name_reason
from clipguard.data.writer import TEMPORARY_SUFFIX, Payload, ShardSequenceWriter, WrittenShard, member_name
from clipguard.errors import ClipguardError
from clipguard.data.sourcemeta import ScrapeSidecar, meta_from_json, read_sidecar
from clipguard.filtering import keeplist
from clipguard.filtering.auditflags import AuditFlags, AuditReason, calibrated_audit
from clipguard.filtering.decide import Decision, Verdict, decide
from clipguard.filtering.scores import ScoredSample, ScoreSources, gather_scores, read_shard_scores, scored_samples
from clipguard.filtering.threshold import FLAG_RULE, Threshold, check_threshold_model, same_fingerprint
from clipguard.model.loading import LoadedModel
from clipguard.scoring.run import ScoreConfig, ScoreProgress
from clipguard.scoring.scorefiles import atomic_write_json

DEFAULT_SHARD_SIZE = 10_000
MANIFEST_NAME = "filter_manifest.json"
RECORD_SUFFIX = ".filter.json"
SCORES_SUBDIR = "scores"
SIDECAR_EXT = "clipguard.json"
CLEAN_TAG = "clean"
QUARANTINE_TAG = "quarantine"


@dataclass(frozen=True)
class FilterConfig:
    clean_dir: Path | str  # a folder, or an object-store URL (s3://...)
    quarantine_dir: Path | str
    shard_size: int = DEFAULT_SHARD_SIZE
    reuse_scores: Path | None = None  # a score folder to reuse (read only)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    keep_list: Path | None = None  # a Parquet of kept key / uid / url / shard
    subset_file: Path | None = None  # DataComp's subset .npy of kept uids
    copy_shards: bool = True  # False: only the lists and the manifest, no tars
    audit: AuditFlags | None = None  # flag also a finding's pairs and cross-pair signals over their thresholds

    @property
    def wants_lists(self) -> bool:
        return self.keep_list is not None or self.subset_file is not None


@dataclass
class FilterProgress:
    """Passed to the progress callback: while scoring, then after every filtered shard."""

    phase: str  # "score" or "filter"
    shards_done: int
    shards_total: int
    pairs_done: int


@dataclass
class InputShardResult:
    shard: str
    url: str
    read: int
    kept: int
    flagged: int
    errored: int
    errors_by_reason: dict[str, int]
    truncated: bool
    read_error: str | None
    scores: str  # "reused" (from --scores) or "scored" (in this output's scores/ folder)
    score_file: str
    clean: list[dict[str, Any]]  # WrittenShard.to_dict() of each clean part
    quarantine: list[dict[str, Any]]
    skipped_on_resume: bool = False

    @property
    def quarantined(self) -> int:
        return self.flagged + self.errored

    failed: bool = False  # the source failed (see ShardReport.failed): no output was kept
    scrape: dict | None = None  # img2dataset's report beside the shard: downloads the scrape lost
    # flagged pairs by what flagged them: "distance", "finding", or a cross-pair signal's name
    # (a pair flagged by two counts under both); empty without an audit
    flagged_by: dict[str, int] = field(default_factory=dict)

    @property
    def unreadable(self) -> bool:
        """Not read in full or not at all: no output was written, and a rerun will try again."""
        return self.failed or (self.read_error is not None and self.read == 0)


@dataclass
class FilterSummary:
    clean_dir: Path
    quarantine_dir: Path
    manifest_path: Path
    threshold: Threshold
    shards: list[InputShardResult]
    wall_seconds: float

    @property
    def read(self) -> int:
        return sum(r.read for r in self.shards)

    @property
    def kept(self) -> int:
        return sum(r.kept for r in self.shards)

    @property
    def flagged(self) -> int:
        return sum(r.flagged for r in self.shards)

    @property
    def errored(self) -> int:
        return sum(r.errored for r in self.shards)

    @property
    def errors_by_reason(self) -> dict[str, int]:
        total: Counter = Counter()
        for r in self.shards:
            total.update(r.errors_by_reason)
        return dict(total)

    @property
    def unreadable(self) -> list[InputShardResult]:
        return [r for r in self.shards if r.unreadable]

    @property
    def scrape_lost(self) -> int:
        return sum((r.scrape or {}).get("failed", 0) for r in self.shards)

    keep_list: Path | None = None
    subset_file: Path | None = None
    subset_uids: int = 0


FilterProgressCallback = Callable[[FilterProgress], None]


def filter_shards(
    shards: list[Shard],
    loaded: LoadedModel,
    threshold: Threshold,
    config: FilterConfig,
    progress: FilterProgressCallback | None = None,
) -> FilterSummary:
    fingerprint = loaded.info.fingerprint()
    check_threshold_model(threshold, fingerprint)
    config = dataclasses.replace(config, audit=calibrated_audit(threshold, config.audit))
    if config.shard_size < 1:
        raise ClipguardError("--shard-size must be at least 1")
    clean_out, quarantine_out = OutputFolder.at(config.clean_dir), OutputFolder.at(config.quarantine_dir)
    if not (clean_out.is_local and quarantine_out.is_local):
        mirror = RemoteMirror.start(clean_out, quarantine_out)
        return _filter_shards(shards, loaded, threshold, config, progress, clean_out.staging, quarantine_out.staging, mirror)
    clean_dir, quarantine_dir = _prepare_dirs(shards, config)
    with exclusive_folder(clean_dir), exclusive_folder(quarantine_dir):
        return _filter_shards(shards, loaded, threshold, config, progress, clean_dir, quarantine_dir)


def _filter_shards(
    shards: list[Shard],
    loaded: LoadedModel,
    threshold: Threshold,
    config: FilterConfig,
    progress: FilterProgressCallback | None,
    clean_dir: Path,
    quarantine_dir: Path,
    mirror: "RemoteMirror | None" = None,
) -> FilterSummary:
    start = time.perf_counter()
    fingerprint = loaded.info.fingerprint()
    settings = _settings(threshold, fingerprint, config.shard_size, mirror.quarantine.location if mirror else quarantine_dir)
    if not config.copy_shards:
        settings["copy_shards"] = False  # only when off, so records of earlier runs still match
    if config.audit is not None:
        settings["audit"] = config.audit.settings()  # only when given, likewise
    results: dict[str, InputShardResult] = {}
    pending: list[Shard] = []
    for shard in shards:
        finished = _finished_result(shard, clean_dir, quarantine_dir, settings, mirror.present if mirror else None)
        if finished is not None and config.wants_lists and not keeplist.shard_kept_present(clean_dir, shard.name):
            finished = None  # finished before lists were asked for: read it again for its list
        if finished is not None:
            results[shard.name] = finished
        else:
            pending.append(shard)

    manifest_path = clean_dir / MANIFEST_NAME
    context = _ManifestContext(manifest_path, clean_dir, quarantine_dir, threshold, fingerprint, config, shards, mirror)
    _write_manifest(context, results)
    if pending:
        sources = gather_scores(
            pending,
            loaded,
            config.reuse_scores,
            clean_dir / SCORES_SUBDIR,
            config.score,
            progress=_score_progress_adapter(progress),
        )
        if mirror is not None:
            mirror.push_scores(clean_dir / SCORES_SUBDIR)
        pairs_done = 0
        for shard in pending:
            if mirror is not None:
                mirror.remove_outputs(shard.name)
            result = _filter_one(shard, sources, threshold, settings, clean_dir, quarantine_dir, config)
            if mirror is not None:
                mirror.push_shard(result)
            results[shard.name] = result
            _write_manifest(context, results)
            pairs_done += result.read
            if progress:
                done = sum(1 for s in shards if s.name in results)
                progress(FilterProgress("filter", done, len(shards), pairs_done))

    summary = FilterSummary(
        clean_dir=clean_dir,
        quarantine_dir=quarantine_dir,
        manifest_path=manifest_path,
        threshold=threshold,
        shards=[results[s.name] for s in shards],
        wall_seconds=time.perf_counter() - start,
    )
    _write_lists(summary, config, mirror)
    summary.wall_seconds = time.perf_counter() - start
    return summary


def _write_lists(summary: FilterSummary, config: FilterConfig, mirror: "RemoteMirror | None") -> None:
    """The keep list and subset file over every readable shard, and sizes.json per folder."""
    readable = [r.shard for r in summary.shards if not r.unreadable]
    if config.wants_lists:
        kept = keeplist.read_kept(summary.clean_dir, readable)
        if config.keep_list is not None:
            keeplist.write_keep_list(config.keep_list, kept)
            summary.keep_list = Path(config.keep_list)
        if config.subset_file is not None:
            summary.subset_uids = keeplist.write_subset_file(config.subset_file, kept.column("uid").to_pylist())
            summary.subset_file = Path(config.subset_file)
    if not config.copy_shards:
        return
    for folder, tag, parts in (
        (summary.clean_dir, CLEAN_TAG, [p for r in summary.shards for p in r.clean]),
        (summary.quarantine_dir, QUARANTINE_TAG, [p for r in summary.shards for p in r.quarantine]),
    ):
        keeplist.write_sizes(folder, parts)
        if mirror is not None:
            target = mirror.clean if tag == CLEAN_TAG else mirror.quarantine
            target.write_bytes(keeplist.SIZES_NAME, (folder / keeplist.SIZES_NAME).read_bytes())


def _score_progress_adapter(progress: FilterProgressCallback | None):
    if progress is None:
        return None

    def on_score(event: ScoreProgress) -> None:
        progress(FilterProgress("score", event.shards_done, event.shards_total, event.pairs_done))

    return on_score


def check_output_folders(shards: list[Shard], config: FilterConfig) -> tuple[Path, Path]:
    """The resolved clean and quarantine folders, or an error if they would mix with each other
    or with the inputs. Cheap, so callers can run it before loading a model. Object-store outputs
    are checked when the run starts (`RemoteMirror.start`)."""
    if not (OutputFolder.at(config.clean_dir).is_local and OutputFolder.at(config.quarantine_dir).is_local):
        return config.clean_dir, config.quarantine_dir
    clean_dir = Path(config.clean_dir).expanduser().resolve()
    quarantine_dir = Path(config.quarantine_dir).expanduser().resolve()
    if clean_dir == quarantine_dir:
        raise ClipguardError("--out and --quarantine must be different folders, or quarantined pairs would mix with clean ones")
    input_dirs = {Path(s.url).resolve().parent for s in shards if not s.is_remote and not s.url.startswith("pipe:")}
    for label, folder in (("--out", clean_dir), ("--quarantine", quarantine_dir)):
        if folder in input_dirs:
            raise ClipguardError(
                f"{label} {folder} holds input shards; write outputs to another folder so that "
                "a later run over the same folder does not read them as input"
            )
        if folder.exists() and not folder.is_dir():
            raise ClipguardError(f"{label} {folder} exists and is not a folder")
    owner = _recorded_clean_dir(quarantine_dir / MANIFEST_NAME)
    if owner is not None and owner != str(clean_dir):
        # A rerun redoes a shard by first deleting its old parts; those would be another run's.
        raise ClipguardError(
            f"--quarantine {quarantine_dir} holds the quarantine of the run writing to {owner}; "
            "give each --out its own --quarantine folder"
        )
    return clean_dir, quarantine_dir


def _recorded_clean_dir(manifest_path: Path) -> str | None:
    try:
        return json.loads(manifest_path.read_text()).get("clean_dir")
    except (OSError, ValueError, AttributeError):
        return None


def _prepare_dirs(shards: list[Shard], config: FilterConfig) -> tuple[Path, Path]:
    clean_dir, quarantine_dir = check_output_folders(shards, config)
    clean_dir.mkdir(parents=True, exist_ok=True)
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    return clean_dir, quarantine_dir


def _settings(threshold: Threshold, fingerprint: dict, shard_size: int, quarantine_dir: Path) -> dict[str, Any]:
    """What must be equal for a finished shard's outputs to be reused as they are."""
    return {
        "gamma": threshold.gamma,
        "model_fingerprint": fingerprint,
        "shard_size": shard_size,
        "quarantine_dir": str(quarantine_dir),
    }


def record_path(clean_dir: Path, shard_name: str) -> Path:
    return Path(clean_dir) / f"{shard_name}{RECORD_SUFFIX}"


def _finished_result(
    shard: Shard, clean_dir: Path, quarantine_dir: Path, settings: dict[str, Any],
    present: Callable[[str, dict], bool] | None = None,
) -> InputShardResult | None:
    path = record_path(clean_dir, shard.name)
    try:
        record = json.loads(path.read_text())
        recorded_settings = record["settings"]
        result = InputShardResult(**{**record["result"], "skipped_on_resume": True})
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no record, or one cut short: the shard is redone
    if record.get("source") != shard.location:
        raise ClipguardError(
            f"{clean_dir} already holds filter output for a different shard named {shard.name} "
            f"(from {record.get('source')}); filter into a new --out folder"
        )
    changed = [k for k in settings if not same_fingerprint(recorded_settings.get(k), settings[k])]
    if changed:
        raise ClipguardError(
            f"{clean_dir} already holds output for shard {shard.name} made with a different "
            f"{', '.join(changed)}; filter into a new --out folder (or delete that folder to redo it)"
        )
    if present is not None:  # the parts live in an object store
        parts_there = all(present(CLEAN_TAG, p) for p in result.clean) and all(present(QUARANTINE_TAG, p) for p in result.quarantine)
        return result if parts_there else None
    parts = [(clean_dir, p) for p in result.clean] + [(quarantine_dir, p) for p in result.quarantine]
    if not all(_part_present(folder / p["file"], p["bytes"]) for folder, p in parts):
        return None
    return result


def _part_present(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _filter_one(
    shard: Shard,
    sources: ScoreSources,
    threshold: Threshold,
    settings: dict[str, Any],
    clean_dir: Path,
    quarantine_dir: Path,
    config: FilterConfig,
) -> InputShardResult:
    shard_size, limits = config.shard_size, config.score.limits
    record_path(clean_dir, shard.name).unlink(missing_ok=True)
    _remove_outputs(shard.name, clean_dir, CLEAN_TAG)
    _remove_outputs(shard.name, quarantine_dir, QUARANTINE_TAG)
    if shard.name in sources.failed:
        return _failed_result(shard, sources, sources.failed[shard.name])
    scores = read_shard_scores(shard.name, sources.files[shard.name])
    clean = ShardSequenceWriter(clean_dir, f"{shard.name}-{CLEAN_TAG}", shard_size)
    quarantine = ShardSequenceWriter(quarantine_dir, f"{shard.name}-{QUARANTINE_TAG}", shard_size)
    report = ShardReport(shard=shard.name, url=shard.url)
    verdicts: Counter = Counter()
    reasons: Counter = Counter()
    sidecar = read_sidecar(shard)
    kept_pairs: list[keeplist.KeptPair] = []
    audit_reasons = config.audit.shard_reasons(shard.name) if config.audit is not None else {}
    flagged_by: Counter = Counter()
    try:
        for scored in scored_samples(shard, scores, report, True, limits.max_member_bytes):
            audit_reason = audit_reasons.get(scored.sample.key)
            decision = decide(scored, threshold, audit_reason.text if audit_reason else None)
            verdicts[decision.verdict] += 1
            if decision.verdict is Verdict.flagged and config.audit is not None:
                flagged_by.update(_flagged_by(threshold, scored, audit_reason))
            if decision.verdict is Verdict.kept:
                kept_pairs.append(_kept_pair(scored, shard.name, sidecar))
                if config.copy_shards:
                    clean.write(scored.sample.key, [(m.name, _payload(m)) for m in scored.sample.members])
                continue
            if decision.verdict is Verdict.errored:
                reasons[_reason_class(decision.reason)] += 1
            if config.copy_shards:
                out_key, members = quarantine_sample(scored, decision, threshold, shard.name)
                quarantine.write(out_key, members, allow_repeated_names=True)
        read = sum(verdicts.values())
        if report.failed:
            # Not read in full (the source failed) or not at all: record nothing, so a rerun
            # retries it rather than keeping a part of the shard as if it were all of it.
            clean.abort()
            quarantine.abort()
            clean_parts: list[WrittenShard] = []
            quarantine_parts: list[WrittenShard] = []
        else:
            clean_parts = clean.commit()
            quarantine_parts = quarantine.commit()
    except BaseException:
        clean.abort()
        quarantine.abort()
        raise
    result = InputShardResult(
        shard=shard.name,
        url=shard.url,
        read=read,
        kept=verdicts[Verdict.kept],
        flagged=verdicts[Verdict.flagged],
        errored=verdicts[Verdict.errored],
        errors_by_reason=dict(sorted(reasons.items())),
        truncated=report.truncated,
        read_error=report.read_error,
        scores=sources.origin(shard.name),
        score_file=str(sources.files[shard.name]),
        clean=[p.to_dict() for p in clean_parts],
        quarantine=[p.to_dict() for p in quarantine_parts],
        failed=report.failed,
        scrape=sidecar.report.to_dict() if sidecar.report is not None else None,
        flagged_by=dict(sorted(flagged_by.items())),
    )
    assert result.kept + result.quarantined == result.read
    if not result.unreadable:
        if config.wants_lists:  # before the record, which marks the shard finished
            keeplist.write_shard_kept(clean_dir, shard.name, kept_pairs)
        record = {"source": shard.location, "settings": settings, "result": asdict(result)}
        atomic_write_json(record_path(clean_dir, shard.name), record)
    return result


def _flagged_by(threshold: Threshold, scored: ScoredSample, audit_reason: AuditReason | None) -> list[str]:
    """Which rules flagged this pair, for the counts a person compares signals by."""
    by = ["distance"] if scored.distance is not None and threshold.flags(scored.distance) else []
    return by + list(audit_reason.by if audit_reason else ())


def _kept_pair(scored: ScoredSample, shard_name: str, sidecar: ScrapeSidecar) -> keeplist.KeptPair:
    key = scored.sample.key
    meta = meta_from_json(scored.sample.fields.get("json")).filled_from(sidecar.meta(key))
    return keeplist.KeptPair(key=key, uid=meta.uid, url=meta.url, shard=shard_name)


def _failed_result(shard: Shard, sources: ScoreSources, why: str) -> InputShardResult:
    return InputShardResult(
        shard=shard.name, url=shard.url, read=0, kept=0, flagged=0, errored=0, errors_by_reason={},
        truncated=False, read_error=why, scores=sources.origin(shard.name),
        score_file=str(sources.files[shard.name]), clean=[], quarantine=[], failed=True,
    )


def _payload(member: Member) -> Payload:
    return member.data if member.spool is None else member


def _remove_outputs(shard_name: str, folder: Path, tag: str) -> None:
    """Parts of an earlier, unfinished attempt (final or temporary names) for this shard only."""
    pattern = re.compile(rf"^{re.escape(shard_name)}-{tag}-\d{{6,}}\.tar({re.escape(TEMPORARY_SUFFIX)})?$")
    for path in folder.iterdir():
        if pattern.match(path.name) and path.is_file():
            path.unlink()


def _reason_class(reason: str | None) -> str:
    """'error: corrupt_image: OSError: ...' -> 'corrupt_image'."""
    text = (reason or "error: unknown").removeprefix("error: ")
    return text.split(":", 1)[0].split(";", 1)[0].strip() or "unknown"


def quarantine_sample(
    scored: ScoredSample, decision: Decision, threshold: Threshold, shard_name: str
) -> tuple[str, list[tuple[str, Payload]]]:
    """The quarantined sample: every member's bytes as they were, plus a sidecar with the reason.

    Members keep their names where those are safe to write. A member whose name is not (``..``,
    absolute, or a key made from such a name) is written under a stand-in name, and the sidecar
    maps it back; a link or device member has no bytes, so the sidecar records it instead."""
    key = scored.sample.key
    out_key = key if unsafe_name_reason(member_name(key, "x")) is None else _safe_stand_in(key)
    written: list[tuple[str, Payload]] = []
    renamed, not_copied = [], []
    for index, member in enumerate(scored.sample.members):
        if not member.has_bytes:
            reason = member.unsafe or "the shard ends inside this member (truncated)"
            not_copied.append({"member": printable_key(member.name), "reason": reason, "link": member.link})
            continue
        name = member.name
        if member.unsafe is not None or out_key != key:
            name = _stand_in_name(out_key, member, index)
            renamed.append({"member": printable_key(member.name), "written_as": name, "reason": member.unsafe})
        written.append((name, _payload(member)))
    sidecar = {
        "reason": decision.reason,
        "verdict": decision.verdict.value,
        "distance": decision.distance,
        "gamma": threshold.gamma,
        "flag_rule": FLAG_RULE,
        "source_shard": shard_name,
        "position": scored.position,
        "key": key,
        "problems": scored.sample.problems,
    }
    if renamed:
        sidecar["renamed_members"] = renamed
    if not_copied:
        sidecar["members_without_bytes"] = not_copied
    sidecar_name = _free_sidecar_name(out_key, {name for name, _ in written})
    written.append((sidecar_name, (json.dumps(sidecar, sort_keys=True) + "\n").encode()))
    return out_key, written


def _safe_stand_in(key: str) -> str:
    return "unsafe-" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]


_PLAIN_EXT = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")


def _stand_in_name(out_key: str, member: Member, index: int) -> str:
    """``<key>.<ext>`` where the extension is plain, else ``<key>.member<index>``."""
    if _PLAIN_EXT.match(member.ext) and ".." not in member.ext:
        return f"{out_key}.{member.ext}"
    return f"{out_key}.member{index}"


def _free_sidecar_name(out_key: str, taken: set[str]) -> str:
    """`<key>.clipguard.json`, unless the sample already carries a member of that name."""
    name, n = member_name(out_key, SIDECAR_EXT), 1
    while name in taken:
        n += 1
        name = member_name(out_key, f"clipguard{n}.json")
    return name


@dataclass(frozen=True)
class _ManifestContext:
    path: Path
    clean_dir: Path
    quarantine_dir: Path
    threshold: Threshold
    fingerprint: dict[str, Any]
    config: FilterConfig
    shards: list[Shard]
    mirror: "RemoteMirror | None" = None


def _write_manifest(context: _ManifestContext, results: dict[str, InputShardResult]) -> None:
    done = [results[s.name] for s in context.shards if s.name in results]
    complete = len(done) == len(context.shards) and not any(r.unreadable for r in done)
    totals = {
        "read": sum(r.read for r in done),
        "kept": sum(r.kept for r in done),
        "flagged": sum(r.flagged for r in done),
        "errored": sum(r.errored for r in done),
    }
    totals["quarantined"] = totals["flagged"] + totals["errored"]
    if any(r.scrape for r in done):
        # Not among "read": img2dataset failed to download them, so they never reached a shard.
        totals["scrape_lost"] = sum((r.scrape or {}).get("failed", 0) for r in done)
    reasons: Counter = Counter()
    for r in done:
        reasons.update(r.errors_by_reason)
    manifest = {
        "clipguard_version": clipguard.__version__,
        "complete": complete,
        "flag_rule": FLAG_RULE,
        "threshold": context.threshold.to_dict(),
        "gamma": context.threshold.gamma,
        "gamma_source": context.threshold.source,
        "model_fingerprint": context.fingerprint,
        "shard_size": context.config.shard_size,
        "clean_dir": context.mirror.clean.location if context.mirror else str(context.clean_dir),
        "quarantine_dir": context.mirror.quarantine.location if context.mirror else str(context.quarantine_dir),
        "scores_reused_from": str(context.config.reuse_scores) if context.config.reuse_scores else None,
        "copied_shards": context.config.copy_shards,
        "keep_list": str(context.config.keep_list) if context.config.keep_list else None,
        "subset_file": str(context.config.subset_file) if context.config.subset_file else None,
        "shards_total": len(context.shards),
        "shards_done": sum(1 for r in done if not r.unreadable),
        "unreadable_shards": [r.shard for r in done if r.unreadable],
        "truncated_shards": [r.shard for r in done if r.truncated],
        "totals": totals,
        "errors_by_reason": dict(sorted(reasons.items())),
        "audit": _audit_entry(context.config.audit, done),
        "inputs": [_input_entry(r) for r in done],
        "outputs": {
            CLEAN_TAG: [{**p, "source_shard": r.shard} for r in done for p in r.clean],
            QUARANTINE_TAG: [{**p, "source_shard": r.shard} for r in done for p in r.quarantine],
        },
    }
    atomic_write_json(context.path, manifest)
    # The same manifest beside the quarantine shards, so that folder explains itself too.
    atomic_write_json(context.quarantine_dir / MANIFEST_NAME, manifest)
    if context.mirror is not None:
        context.mirror.push_manifest(manifest)


def _audit_entry(audit: AuditFlags | None, done: list[InputShardResult]) -> dict[str, Any] | None:
    if audit is None:
        return None
    flagged_by: Counter = Counter()
    for r in done:
        flagged_by.update(r.flagged_by)
    return {**audit.settings(), "findings": audit.n_findings, "finding_pairs": len(audit.finding_of),
            "flagged_by": dict(sorted(flagged_by.items()))}


def _input_entry(result: InputShardResult) -> dict[str, Any]:
    entry = asdict(result)
    entry["quarantined"] = result.quarantined
    entry["clean"] = [p["file"] for p in result.clean]
    entry["quarantine"] = [p["file"] for p in result.quarantine]
    return entry


def output_paths(summary: FilterSummary) -> list[Path]:
    """Every output part of a run, clean first."""
    clean = [summary.clean_dir / p["file"] for r in summary.shards for p in r.clean]
    quarantine = [summary.quarantine_dir / p["file"] for r in summary.shards for p in r.quarantine]
    return clean + quarantine


class RemoteMirror:
    """Filter output in object stores: parts are written under local staging folders exactly as
    for local output, then each finished input shard's parts are uploaded (each object appears
    whole), then its record, which marks it finished. Resume reads the records back and checks
    that every part they name is in the store."""

    def __init__(self, clean: OutputFolder, quarantine: OutputFolder):
        self.clean, self.quarantine = clean, quarantine

    @classmethod
    def start(cls, clean: OutputFolder, quarantine: OutputFolder) -> "RemoteMirror":
        if clean.location == quarantine.location:
            raise ClipguardError("--out and --quarantine must be different folders, or quarantined pairs would mix with clean ones")
        mirror = cls(clean, quarantine)
        for name in clean.list(RECORD_SUFFIX):  # what earlier runs finished
            (clean.staging / name).write_bytes(clean.read_bytes(name))
        quarantine.staging.mkdir(parents=True, exist_ok=True)
        return mirror

    def present(self, tag: str, part: dict) -> bool:
        return (self.clean if tag == CLEAN_TAG else self.quarantine).exists(part["file"])

    def remove_outputs(self, shard_name: str) -> None:
        """Parts an unfinished attempt at this shard uploaded (a new attempt may make fewer)."""
        for folder, tag in ((self.clean, CLEAN_TAG), (self.quarantine, QUARANTINE_TAG)):
            pattern = re.compile(rf"^{re.escape(shard_name)}-{tag}-\d{{6,}}\.tar$")
            for name in folder.list(".tar"):
                if pattern.match(name):
                    folder.remove(name)

    def push_shard(self, result: InputShardResult) -> None:
        for folder, parts in ((self.clean, result.clean), (self.quarantine, result.quarantine)):
            for part in parts:
                folder.publish(part["file"])
        record = record_path(self.clean.staging, result.shard)
        if record.is_file():
            self.clean.write_bytes(record.name, record.read_bytes())

    def push_scores(self, scores_dir: Path) -> None:
        """The scores computed for this run, beside the clean shards as for local output."""
        if not scores_dir.is_dir():
            return
        target = OutputFolder.at(f"{self.clean.location}/{SCORES_SUBDIR}")
        for path in sorted(scores_dir.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                target.write_bytes(path.name, path.read_bytes())

    def push_manifest(self, manifest: dict[str, Any]) -> None:
        data = (json.dumps(manifest, indent=2) + "\n").encode()
        self.clean.write_bytes(MANIFEST_NAME, data)
        self.quarantine.write_bytes(MANIFEST_NAME, data)
