"""``run_attack``: clean shards -> poisoned shards + poison_manifest.json, deterministic per seed.

Index the clean data (labels, captions, image hashes) -> choose poison sources for the attack
-> read only those samples -> build the poisons -> place them at seeded positions -> write every
shard again with the poisons among the clean samples -> write the manifest. ``--evade`` changes
the choosing (``nearest``, ``clean-label``, ``many-captions``) or rewrites the chosen captions
once their samples are read (``blend``); placement and writing are the same for every variant.

Each random choice has its own stream derived from the seed, so changing how poisons are placed
never changes which poisons are made.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipguard.attacks import carlini, nearest, yang
from clipguard.attacks.blend import blend_plans
from clipguard.attacks.evade import DEFAULT_SURROGATE, EvadeVariant, check_evade
from clipguard.attacks.goals import AttackError, AttackKind, Goal, check_goals
from clipguard.attacks.index import CleanIndex, IndexedSample, build_index, fetch_fields
from clipguard.attacks.inject import (
    KeyPolicy,
    OutputShard,
    layout,
    place_poisons,
    poison_fields,
    prepare_out_dir,
    write_shards,
)
from clipguard.attacks.manifest import MANIFEST_NAME, PoisonManifest, PoisonRecord, SourceRef
from clipguard.attacks.plan import CaptionSource, PoisonPlan, achieved_rate, poison_count_for_rate
from clipguard.attacks.surrogate import Surrogate
from clipguard.attacks.trigger import TriggerSpec
from clipguard.data.shardspec import Shard, resolve_shards
from clipguard.labels import LabelSource, load_keywords, make_labeler

_SELECT_STREAM, _PLACE_STREAM, _KEY_STREAM, _BLEND_STREAM = 1, 2, 3, 4


@dataclass(frozen=True)
class AttackConfig:
    kind: AttackKind
    goals: tuple[Goal, ...]
    rate: float | None = None  # φ = |Dp| / |D|; exactly one of rate and count
    count: int | None = None
    seed: int = 0
    label_source: LabelSource = LabelSource.auto
    keywords: Path | None = None
    target_image: str | None = None  # clean key of x* (single-image) or x' (targeted)
    trigger: TriggerSpec = field(default_factory=TriggerSpec)
    caption_source: CaptionSource = CaptionSource.data
    key_policy: KeyPolicy = KeyPolicy.renumber
    overwrite: bool = False
    evade: EvadeVariant | None = None  # a variant built to pass a pair filter (evade.py)
    surrogate: str = DEFAULT_SURROGATE  # the attacker's model, for --evade nearest

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", AttackKind(self.kind))
        object.__setattr__(self, "caption_source", CaptionSource(self.caption_source))
        object.__setattr__(self, "key_policy", KeyPolicy(self.key_policy))
        object.__setattr__(self, "label_source", LabelSource(self.label_source))
        object.__setattr__(self, "goals", check_goals(self.kind, self.goals))
        if (self.rate is None) == (self.count is None):
            raise AttackError("give exactly one of --rate and --count")
        if self.count is not None and self.count < 1:
            raise AttackError(f"--count {self.count} must be at least 1")
        if self.seed < 0:
            raise AttackError("--seed must be non-negative")
        yang_kinds = (AttackKind.single_image, AttackKind.single_label, AttackKind.multi_label)
        if self.kind in yang_kinds and self.caption_source is not CaptionSource.data:
            raise AttackError(f"{self.kind.value} poisons with captions of the data; --caption-source applies to "
                              "targeted and backdoor")
        if self.target_image is not None and self.kind not in (AttackKind.single_image, AttackKind.targeted):
            raise AttackError("--target-image applies to single-image and targeted")
        object.__setattr__(self, "evade", check_evade(self.kind, self.evade))
        if self.evade is EvadeVariant.many_captions and self.caption_source is not CaptionSource.data:
            raise AttackError("--evade many-captions uses data captions and templates together; leave out --caption-source")
        if self.evade is EvadeVariant.clean_label and self.caption_source is not CaptionSource.data:
            raise AttackError("--evade clean-label keeps each image's own caption; --caption-source does not apply")
        if self.surrogate != DEFAULT_SURROGATE and self.evade is not EvadeVariant.nearest:
            raise AttackError("--surrogate is the model --evade nearest ranks images with; it applies to nearest only")

    @property
    def caption_source_label(self) -> str:
        """What the manifest records as the captions' source."""
        if self.evade is EvadeVariant.many_captions:
            return "data+templates"
        if self.evade is EvadeVariant.blend:
            return "blend"
        return self.caption_source.value


@dataclass
class AttackResult:
    out_dir: Path
    manifest_path: Path
    manifest: PoisonManifest
    shards: list[OutputShard]


@dataclass(frozen=True)
class AttackProgress:
    stage: str  # "index", "write"
    shards_done: int
    shards_total: int


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def plan_poisons(index: CleanIndex, config: AttackConfig, count: int,
                 keywords: dict[str, list[str]] | None) -> list[PoisonPlan]:
    rng = _rng(config.seed, _SELECT_STREAM)
    known = list(keywords) if keywords is not None and config.label_source is LabelSource.keywords else None
    goal = config.goals[0]
    if config.evade is EvadeVariant.nearest:
        surrogate = Surrogate(config.surrogate)
        if config.kind is AttackKind.single_image:
            return nearest.single_image(index, goal, count, surrogate, rng, config.target_image, known)
        if config.kind is AttackKind.single_label:
            return nearest.single_label(index, goal, count, surrogate, known)
        return nearest.multi_label(index, config.goals, count, surrogate, known)
    if config.evade is EvadeVariant.many_captions:
        return carlini.many_captions(index, goal, count, rng, keywords, config.target_image, known)
    if config.evade is EvadeVariant.clean_label:
        return carlini.clean_label(index, goal, count, rng, keywords, known)
    if config.kind is AttackKind.single_image:
        return yang.single_image(index, goal, count, rng, config.target_image, known)
    if config.kind is AttackKind.single_label:
        return yang.single_label(index, goal, count, rng, known)
    if config.kind is AttackKind.multi_label:
        return yang.multi_label(index, config.goals, count, rng, known)
    if config.kind is AttackKind.targeted:
        return carlini.targeted(index, goal, count, rng, config.caption_source, keywords, config.target_image, known)
    return carlini.backdoor(index, goal, count, rng, config.caption_source, keywords, known)


def run_attack(clean: list[str] | list[Shard] | str, out_dir: str | Path, config: AttackConfig,
               progress: Callable[[AttackProgress], None] | None = None) -> AttackResult:
    out_dir = Path(out_dir)
    shards = clean if clean and isinstance(clean, list) and isinstance(clean[0], Shard) else resolve_shards(clean)
    keywords = load_keywords(config.keywords) if config.keywords is not None else None
    labeler = make_labeler(config.label_source, keywords)

    def report(stage: str, done: int) -> None:
        if progress is not None:
            progress(AttackProgress(stage, done, len(shards)))

    index = build_index(shards, labeler, progress=lambda done, _: report("index", done))
    count = config.count if config.count is not None else poison_count_for_rate(config.rate, index.size)
    plans = plan_poisons(index, config, count, keywords)
    prepare_out_dir(out_dir, index, config.overwrite, MANIFEST_NAME)
    fetched = fetch_fields(index, _sources(plans))
    if config.evade is EvadeVariant.blend:
        plans = blend_plans(plans, fetched, [_caption_class(config.kind, p.goal) for p in plans], keywords,
                            _rng(config.seed, _BLEND_STREAM))
    trigger = config.trigger if config.kind is AttackKind.backdoor else None
    poisons = [poison_fields(plan, fetched, trigger) for plan in plans]
    placements = place_poisons(index.shard_sizes, len(plans), _rng(config.seed, _PLACE_STREAM))
    outputs = layout(index, placements, config.key_policy, out_dir, _rng(config.seed, _KEY_STREAM))
    write_shards(index, outputs, poisons, config.key_policy, progress=lambda done: report("write", done))
    manifest = _manifest(index, config, keywords, plans, poisons, outputs, count)
    return AttackResult(out_dir=out_dir, manifest_path=manifest.write(out_dir), manifest=manifest, shards=outputs)


def _caption_class(kind: AttackKind, goal: Goal) -> str:
    """The class a poison's caption names: A for Yang et al.'s A2B, the label B for Carlini's."""
    return goal.target if kind in (AttackKind.targeted, AttackKind.backdoor) else goal.source


def _sources(plans: list[PoisonPlan]) -> list[IndexedSample]:
    sources = {}
    for plan in plans:
        sources[plan.image_source.key] = plan.image_source
        if plan.text_source is not None:
            sources[plan.text_source.key] = plan.text_source
    return list(sources.values())


def _output_keys(index: CleanIndex, outputs: list[OutputShard]) -> dict[tuple[int, int], str]:
    """(input shard number, offset) -> key of that clean sample in the output."""
    return {(number, slot.offset): slot.key
            for number, shard in enumerate(outputs) for slot in shard.slots if slot.offset is not None}


def _manifest(index: CleanIndex, config: AttackConfig, keywords, plans: list[PoisonPlan],
              poisons: list[dict[str, bytes]], outputs: list[OutputShard], count: int) -> PoisonManifest:
    output_key = _output_keys(index, outputs)

    def ref(sample: IndexedSample | None) -> SourceRef | None:
        if sample is None:
            return None
        return SourceRef(shard=index.shards[sample.shard].name, key=sample.key,
                         output_key=output_key[(sample.shard, sample.offset)], label=sample.label)

    records = []
    for shard in outputs:
        for slot in shard.slots:
            if slot.poison is None:
                continue
            plan = plans[slot.poison]
            image = poisons[slot.poison][plan.image_source.image_field]
            records.append(PoisonRecord(
                key=slot.key, shard=shard.name, goal=str(plan.goal), caption=plan.caption,
                caption_origin=plan.caption_origin, text_source=ref(plan.text_source),
                image_source=ref(plan.image_source), image_sha256=hashlib.sha256(image).hexdigest(),
                triggered=plan.stamp_trigger,
            ))
    goal_counts = {str(g): 0 for g in config.goals}
    for plan in plans:
        goal_counts[str(plan.goal)] += 1
    return PoisonManifest(
        kind=config.kind.value,
        goals=[{**g.to_dict(), "count": goal_counts[str(g)]} for g in config.goals],
        rate=achieved_rate(count, index.size),
        requested={"rate": config.rate} if config.rate is not None else {"count": config.count},
        count=count,
        clean_pairs=index.size,
        seed=config.seed,
        caption_source=config.caption_source_label,
        key_policy=config.key_policy.value,
        labels={"source": config.label_source.value,
                "keywords_file": str(config.keywords) if config.keywords is not None else None,
                "counts": index.label_counts.to_dict()},
        input_shards=[s.url for s in index.shards],
        output_shards=[{"name": s.name, "file": s.path.name, "clean": s.clean, "poisons": s.poisons} for s in outputs],
        poisons=records,
        target_image=_target_image(plans, records, config),
        trigger=config.trigger.to_dict() if config.kind is AttackKind.backdoor else None,
        evade=_evade_record(config),
    )


def _evade_record(config: AttackConfig) -> dict | None:
    if config.evade is None:
        return None
    record = {"variant": config.evade.value}
    if config.evade is EvadeVariant.nearest:
        record["surrogate"] = config.surrogate
    return record


def _target_image(plans: list[PoisonPlan], records: list[PoisonRecord], config: AttackConfig) -> dict | None:
    if config.kind not in (AttackKind.single_image, AttackKind.targeted):
        return None
    target = plans[0].image_source
    return {
        "source_key": target.key,
        "source_shard": records[0].image_source.shard,
        "output_key": records[0].image_source.output_key,
        "class": target.label,
        "sha256": target.image_sha256,
        "poison_keys": [r.key for r in records],
    }
