"""The evaluation harness: a model and labelled test shards in, the paper's numbers out.

    test = load_test_set(["world/test"], labeler)             # read and label once
    report = evaluate(poisoned, test, [Goal("sheep", "aeroplane")], baseline=clean)

- Goal retrieval (Yang et al. §4.1): every test text of class A queries the gallery of all
  distinct test images; the targets are the class-B images, or, for Attack I, only the target
  image x* appended to the gallery. Hit@{1,5,10,20,30,50} and MinRank, with the random-text
  baseline (as many random test texts) and, with ``baseline=``, the same goal on the clean model.
- Utility: TR and IR Hit@{1,5,10} over the test pairs.
- Backdoor (Carlini & Terzis): zero-shot classification of test images stamped with the trigger,
  class prompts from the keywords; success = fraction of non-target images read as the target.
- Encoder drift (Figure 1): mean cosine distance between the model's and the baseline's text
  embeddings, and image embeddings, of the same test inputs.

A TestSet embeds itself once per model (keyed by a hash of the weights) and keeps the
embeddings, so evaluating several models against each other never embeds one model twice.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipguard import metrics
from clipguard.attacks.goals import Goal
from clipguard.attacks.manifest import read_manifest
from clipguard.attacks.trigger import TriggerSpec, stamp_image_bytes
from clipguard.data.handlers import CountFailures, record_and_continue
from clipguard.data.pairs import DecodeLimits, image_field, open_image
from clipguard.data.shardspec import Shard, resolve_shards
from clipguard.data.stages import read_pairs, read_shards, without_shard_ends
from clipguard.errors import ClipguardError
from clipguard.labels import LabelCounts, Labeler, class_prompts, make_labeler
from clipguard.model.encoding import encode_images, encode_texts, tokenize
from clipguard.model.loading import LoadedModel, ModelSpec, load_model

DEFAULT_BATCH_SIZE = 128


class EvaluationError(ClipguardError):
    """A goal, target image or trigger that the test data cannot evaluate."""


# ------------------------------------------------------------------------------------ test data


@dataclass
class TestEmbeddings:
    __test__ = False  # a Test* name that pytest must not collect
    images: torch.Tensor  # [n_images, dim], one row per distinct test image
    texts: torch.Tensor  # [n_pairs, dim]


@dataclass
class TestSet:
    """Usable test pairs, their distinct images (by content hash) and labels."""

    __test__ = False  # a Test* name that pytest must not collect

    shards: list[Shard]
    keys: list[str]
    captions: list[str]
    pair_labels: list[str | None]
    pair_image: np.ndarray  # pair -> index into images
    images: list[bytes]
    image_sha256: list[str]
    image_labels: list[str | None]  # the label all of an image's pairs agree on, else None
    label_counts: LabelCounts
    skipped: Counter = field(default_factory=Counter)  # unusable pairs, by reason
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def n_pairs(self) -> int:
        return len(self.keys)

    def texts_of(self, class_name: str) -> np.ndarray:
        return np.array([i for i, label in enumerate(self.pair_labels) if label == class_name], dtype=np.int64)

    def images_of(self, class_name: str) -> np.ndarray:
        return np.array([i for i, label in enumerate(self.image_labels) if label == class_name], dtype=np.int64)

    def classes(self) -> list[str]:
        return sorted({label for label in self.image_labels if label is not None})

    def use_embeddings(self, loaded: LoadedModel, embeddings: TestEmbeddings) -> None:
        """Adopt embeddings computed elsewhere for ``loaded`` (rows in this set's image and pair
        order) instead of embedding the test set again."""
        if embeddings.images.shape[0] != len(self.images) or embeddings.texts.shape[0] != self.n_pairs:
            raise EvaluationError(
                f"embeddings have {embeddings.images.shape[0]} image and {embeddings.texts.shape[0]} text rows; "
                f"the test set has {len(self.images)} images and {self.n_pairs} pairs"
            )
        self._cache[(model_fingerprint(loaded), "test")] = embeddings

    def summary(self) -> dict[str, Any]:
        return {
            "shards": [s.url for s in self.shards],
            "pairs": self.n_pairs,
            "images": len(self.images),
            "skipped": dict(sorted(self.skipped.items())),
            "labels": self.label_counts.to_dict(),
        }


def load_test_set(specs: list[str] | str | list[Shard], labeler: Labeler | None = None,
                  limits: DecodeLimits = DecodeLimits()) -> TestSet:
    """Read and label the test shards. Pairs that cannot be used are counted by reason."""
    shards = specs if isinstance(specs, list) and specs and isinstance(specs[0], Shard) else resolve_shards(specs)
    labeler = labeler or make_labeler()
    keys, captions, labels, pair_image = [], [], [], []
    images: list[bytes] = []
    image_index: dict[str, int] = {}
    image_pair_labels: list[set] = []
    counts, failures = LabelCounts(), CountFailures()
    skipped = failures.counts  # unusable pairs and unreadable shards, by reason
    for item in without_shard_ends(read_pairs(shards, limits, failures)):
        if not item.ok:
            skipped[item.pair.error] += 1
            continue
        pair, raw = item.pair, item.sample
        label = labeler.label(raw.fields, pair.caption)
        counts.add(label)
        if pair.image_sha256 not in image_index:
            image_index[pair.image_sha256] = len(images)
            images.append(raw.fields[image_field(raw)])
            image_pair_labels.append(set())
        position = image_index[pair.image_sha256]
        image_pair_labels[position].add(label.name)
        keys.append(raw.key)
        captions.append(pair.caption)
        labels.append(label.name)
        pair_image.append(position)
    if not keys:
        raise EvaluationError(f"the test shards hold no usable pair (skipped: {dict(skipped) or 'none'})")
    return TestSet(
        shards=shards, keys=keys, captions=captions, pair_labels=labels,
        pair_image=np.asarray(pair_image, dtype=np.int64), images=images,
        image_sha256=list(image_index), image_labels=[next(iter(s)) if len(s) == 1 else None for s in image_pair_labels],
        label_counts=counts, skipped=skipped,
    )


# ------------------------------------------------------------------------------------ embedding


def model_fingerprint(loaded: LoadedModel) -> str:
    """A hash of the weights themselves: a model fine-tuned in memory is not its starting point."""
    digest = hashlib.sha256()
    for name, tensor in sorted(loaded.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(repr((loaded.info.precision, loaded.info.preprocess, loaded.info.image_size)).encode())
    return digest.hexdigest()


def embed_image_bytes(loaded: LoadedModel, images: Sequence[bytes], batch_size: int = DEFAULT_BATCH_SIZE,
                      limits: DecodeLimits = DecodeLimits()) -> torch.Tensor:
    rows = []
    for start in range(0, len(images), batch_size):
        pixels = []
        for data in images[start:start + batch_size]:
            image, error = open_image(data, limits)
            if image is None:
                raise EvaluationError(f"an image cannot be decoded: {error}")
            pixels.append(loaded.preprocess(image))
        rows.append(encode_images(loaded, torch.stack(pixels)))
    return torch.cat(rows)


def embed_texts(loaded: LoadedModel, captions: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    rows = []
    for start in range(0, len(captions), batch_size):
        tokens = tokenize(loaded.tokenizer, list(captions[start:start + batch_size])).tokens
        rows.append(encode_texts(loaded, tokens))
    return torch.cat(rows)


@dataclass(frozen=True)
class _Model:
    """A loaded model and the hash of its weights at the time of this evaluation."""

    loaded: LoadedModel
    fingerprint: str

    @classmethod
    def of(cls, loaded: LoadedModel) -> _Model:
        # Hashed on every evaluate call, not cached by object: a model fine-tuned in place
        # after one evaluation must not be served the embeddings of its former weights.
        return cls(loaded, model_fingerprint(loaded))


def _cached(test: TestSet, model: _Model, what: Any, compute):
    key = (model.fingerprint, what)
    if key not in test._cache:
        test._cache[key] = compute()
    return test._cache[key]


def embed_test_set(loaded: LoadedModel, test: TestSet, batch_size: int = DEFAULT_BATCH_SIZE) -> TestEmbeddings:
    """The test set under ``loaded``, computed once per model (weights) and kept in ``test``."""
    return _embed_test_set(_Model.of(loaded), test, batch_size)


def _embed_test_set(model: _Model, test: TestSet, batch_size: int = DEFAULT_BATCH_SIZE) -> TestEmbeddings:
    return _cached(test, model, "test", lambda: TestEmbeddings(
        images=embed_image_bytes(model.loaded, test.images, batch_size),
        texts=embed_texts(model.loaded, test.captions, batch_size),
    ))


# ---------------------------------------------------------------------------- targets, triggers


@dataclass(frozen=True)
class TargetImage:
    """Attack I's x*: appended to the gallery as the only target."""

    key: str
    image: bytes
    source: str  # where it was read from

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.image).hexdigest()


def read_target_image(key: str, shard_specs: list[str] | str) -> TargetImage:
    """The image of sample ``key`` in the given shards (the poisoned training shards)."""
    for shard in resolve_shards(shard_specs):
        for raw in without_shard_ends(read_shards([shard], handler=record_and_continue)):
            if raw.key == key:
                field_name = image_field(raw)
                if field_name is None:
                    raise EvaluationError(f"sample {key!r} in {shard.url} has no image")
                return TargetImage(key=key, image=raw.fields[field_name], source=shard.url)
    raise EvaluationError(f"--target-image {key!r} is not in the target shards")


def target_image_from_manifest(manifest_path: str | Path) -> TargetImage:
    """x* of an Attack I (or targeted) manifest, read from the poisoned shards beside it."""
    manifest_path = Path(manifest_path)
    manifest = read_manifest(manifest_path)
    if not manifest.target_image:
        raise EvaluationError(f"{manifest_path} is a {manifest.kind} attack and has no target image")
    folder = manifest_path if manifest_path.is_dir() else manifest_path.parent
    key = manifest.target_image["poison_keys"][0]
    target = read_target_image(key, [str(folder / s["file"]) for s in manifest.output_shards])
    if target.sha256 != manifest.target_image["sha256"]:
        raise EvaluationError(f"the image of poison {key!r} does not match the manifest's target image hash")
    return target


@dataclass(frozen=True)
class BackdoorTrigger:
    target: str  # the label the trigger should force
    spec: TriggerSpec = TriggerSpec()


# -------------------------------------------------------------------------------------- reports


@dataclass
class GoalReport:
    goal: str
    target_kind: str  # "label" (Attack II/III) or "image" (Attack I)
    model: metrics.GoalRetrieval
    random_text: metrics.GoalRetrieval
    baseline: metrics.GoalRetrieval | None = None
    target_image: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "goal": self.goal,
            "target_kind": self.target_kind,
            "target_image": self.target_image,
            "model": self.model.to_dict(),
            "random_text": self.random_text.to_dict(),
            "baseline": self.baseline.to_dict() if self.baseline else None,
        }


@dataclass
class BackdoorReport:
    target: str
    trigger: dict[str, Any]
    classes: list[str]
    success_rate: float
    n_evaluated: int
    n_excluded: int
    clean_accuracy: float  # zero-shot accuracy on the same images without the trigger
    baseline_success_rate: float | None = None
    baseline_clean_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TargetedReport:
    """Carlini & Terzis targeted poisoning: how zero-shot reads the target image."""

    target_image: str
    label: str
    predicted: str | None  # None when the top classes tie
    label_rank: int  # 1 = the label wins; ties counted against it
    success: bool
    baseline_predicted: str | None = None
    baseline_label_rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DriftReport:
    text: float  # mean cosine distance, model vs baseline, over the test captions
    image: float  # the same over the distinct test images
    n_texts: int
    n_images: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class EvaluationReport:
    model: dict[str, Any]
    baseline_model: dict[str, Any] | None
    test: dict[str, Any]
    goals: list[GoalReport]
    utility: metrics.Utility
    baseline_utility: metrics.Utility | None = None
    backdoor: BackdoorReport | None = None
    targeted: TargetedReport | None = None
    drift: DriftReport | None = None
    seed: int = 0

    def goal(self, name: str) -> GoalReport:
        return next(g for g in self.goals if g.goal == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "baseline_model": self.baseline_model,
            "test": self.test,
            "seed": self.seed,
            "goals": [g.to_dict() for g in self.goals],
            "utility": self.utility.to_dict(),
            "baseline_utility": self.baseline_utility.to_dict() if self.baseline_utility else None,
            "backdoor": self.backdoor.to_dict() if self.backdoor else None,
            "targeted": self.targeted.to_dict() if self.targeted else None,
            "drift": self.drift.to_dict() if self.drift else None,
        }


# ------------------------------------------------------------------------------------- evaluate


def _as_loaded(model: LoadedModel | ModelSpec | str) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    return load_model(model if isinstance(model, ModelSpec) else ModelSpec(name=str(model)))


def _model_description(model: _Model) -> dict[str, Any]:
    return {**model.loaded.info.to_dict(), "weights_fingerprint": model.fingerprint}


def _check_goal(test: TestSet, goal: Goal, needs_target_class: bool) -> np.ndarray:
    present = test.classes()
    queries = test.texts_of(goal.source)
    if queries.size == 0:
        raise EvaluationError(
            f"goal {goal}: the test set has no text of class {goal.source!r}"
            f" (classes present: {', '.join(present) or 'none'})"
        )
    if needs_target_class and test.images_of(goal.target).size == 0:
        raise EvaluationError(
            f"goal {goal}: the test set has no image of class {goal.target!r}"
            f" (classes present: {', '.join(present) or 'none'})"
        )
    return queries


def _goal_retrieval(test: TestSet, emb: TestEmbeddings, queries: np.ndarray, goal: Goal,
                    target_embedding: torch.Tensor | None, seed: int) -> tuple[metrics.GoalRetrieval, metrics.GoalRetrieval]:
    if target_embedding is None:
        gallery, targets = emb.images, test.images_of(goal.target)
    else:
        gallery = torch.cat([emb.images, target_embedding[None, :]])
        targets = np.array([gallery.shape[0] - 1])
    hits = metrics.goal_retrieval(emb.texts[queries], gallery, targets)
    random_text = metrics.random_text_baseline(emb.texts, gallery, targets, len(queries), seed=seed)
    return hits, random_text


def _target_embedding(test: TestSet, model: _Model, target: TargetImage | None) -> torch.Tensor | None:
    if target is None:
        return None
    if target.sha256 in test.image_sha256:  # x* is also a test image: same bytes, same embedding
        return _embed_test_set(model, test).images[test.image_sha256.index(target.sha256)]
    return _cached(test, model, ("target", target.sha256), lambda: embed_image_bytes(model.loaded, [target.image])[0])


def _class_embeddings(test: TestSet, model: _Model, classes: list[str],
                      keywords: dict[str, list[str]] | None) -> torch.Tensor:
    def compute() -> torch.Tensor:
        rows = []
        for name in classes:
            mean = embed_texts(model.loaded, class_prompts(name, keywords)).mean(dim=0)
            rows.append(mean / mean.norm())  # CLIP's prompt ensemble: average, then re-normalise
        return torch.stack(rows)

    return _cached(test, model, ("classes", tuple(classes), repr(keywords)), compute)


@dataclass(frozen=True)
class _BackdoorNumbers:
    success_rate: float
    n_evaluated: int
    n_excluded: int
    clean_accuracy: float
    classes: list[str]


def _backdoor(test: TestSet, model: _Model, trigger: BackdoorTrigger, keywords: dict[str, list[str]] | None,
              batch_size: int) -> _BackdoorNumbers:
    classes = test.classes()
    if trigger.target not in classes:
        raise EvaluationError(
            f"backdoor target {trigger.target!r} is not a class of the test set ({', '.join(classes) or 'none'})"
        )
    labelled = np.array([i for i, label in enumerate(test.image_labels) if label is not None], dtype=np.int64)
    true = np.array([classes.index(test.image_labels[i]) for i in labelled], dtype=np.int64)
    class_emb = _class_embeddings(test, model, classes, keywords)
    clean = _embed_test_set(model, test, batch_size).images[labelled]
    stamped = _cached(test, model, ("triggered", repr(trigger.spec.to_dict())), lambda: embed_image_bytes(
        model.loaded, [stamp_image_bytes(image, trigger.spec) for image in test.images], batch_size))
    success = metrics.backdoor_success_rate(stamped[labelled], class_emb, true, classes.index(trigger.target))
    accuracy = metrics.zero_shot_accuracy(clean, class_emb, true)
    return _BackdoorNumbers(success.success_rate, success.n_evaluated, success.n_excluded, accuracy.accuracy, classes)


def _zero_shot_target(test: TestSet, model: _Model, target: TargetImage, label: str,
                      keywords: dict[str, list[str]] | None) -> tuple[str | None, int]:
    classes = test.classes()
    if label not in classes:
        raise EvaluationError(f"targeted label {label!r} is not a class of the test set ({', '.join(classes) or 'none'})")
    class_emb = _class_embeddings(test, model, classes, keywords)
    similarity = metrics.cosine_similarity_matrix(_target_embedding(test, model, target)[None, :], class_emb)
    mask = np.array([name == label for name in classes])
    rank = int(metrics.ranks_from_similarity(similarity, mask)[0])
    prediction = int(metrics.zero_shot_predictions(_target_embedding(test, model, target)[None, :], class_emb)[0])
    return (classes[prediction] if prediction >= 0 else None), rank


def evaluate(
    model: LoadedModel | ModelSpec | str,
    test: TestSet | list[str] | str,
    goals: Sequence[Goal] = (),
    *,
    target_image: TargetImage | None = None,
    baseline: LoadedModel | ModelSpec | str | None = None,
    trigger: BackdoorTrigger | None = None,
    target_label: str | None = None,
    keywords: dict[str, list[str]] | None = None,
    labeler: Labeler | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> EvaluationReport:
    """Every metric the inputs allow. ``test`` may be a TestSet (reused across models) or specs.

    With ``target_image`` every goal is evaluated as Attack I: x* is appended to the gallery and
    is the only target; with ``target_label`` too, the target image is also classified zero-shot
    (Carlini & Terzis targeted poisoning: success = it reads as that label). ``keywords`` give the backdoor test its class prompts (class names are
    used without them) and, when ``test`` is given as specs, the labels.
    """
    if not isinstance(test, TestSet):
        test = load_test_set(test, labeler or make_labeler(keywords=keywords))
    goal_checks = [(goal, _check_goal(test, goal, needs_target_class=target_image is None)) for goal in goals]
    subject = _Model.of(_as_loaded(model))
    reference = _Model.of(_as_loaded(baseline)) if baseline is not None else None
    emb = _embed_test_set(subject, test, batch_size)
    ref_emb = _embed_test_set(reference, test, batch_size) if reference is not None else None

    reports = []
    for goal, queries in goal_checks:
        hits, random_text = _goal_retrieval(test, emb, queries, goal, _target_embedding(test, subject, target_image), seed)
        baseline_hits = None
        if reference is not None:
            baseline_hits, _ = _goal_retrieval(test, ref_emb, queries, goal,
                                               _target_embedding(test, reference, target_image), seed)
        reports.append(GoalReport(
            goal=str(goal), target_kind="image" if target_image else "label", model=hits,
            random_text=random_text, baseline=baseline_hits, target_image=target_image.key if target_image else None,
        ))

    image_ids = np.array(test.image_sha256)[test.pair_image]
    utility = metrics.retrieval_utility(emb.images[test.pair_image], emb.texts, image_ids)
    baseline_utility = (metrics.retrieval_utility(ref_emb.images[test.pair_image], ref_emb.texts, image_ids)
                        if ref_emb is not None else None)

    backdoor = None
    if trigger is not None:
        numbers = _backdoor(test, subject, trigger, keywords, batch_size)
        backdoor = BackdoorReport(target=trigger.target, trigger=trigger.spec.to_dict(), classes=numbers.classes,
                                  success_rate=numbers.success_rate, n_evaluated=numbers.n_evaluated,
                                  n_excluded=numbers.n_excluded, clean_accuracy=numbers.clean_accuracy)
        if reference is not None:
            clean_numbers = _backdoor(test, reference, trigger, keywords, batch_size)
            backdoor.baseline_success_rate = clean_numbers.success_rate
            backdoor.baseline_clean_accuracy = clean_numbers.clean_accuracy

    targeted = None
    if target_label is not None:
        if target_image is None:
            raise EvaluationError("a targeted label needs the target image (--target-image or --manifest)")
        predicted, rank = _zero_shot_target(test, subject, target_image, target_label, keywords)
        targeted = TargetedReport(target_image=target_image.key, label=target_label, predicted=predicted,
                                  label_rank=rank, success=rank == 1)
        if reference is not None:
            targeted.baseline_predicted, targeted.baseline_label_rank = _zero_shot_target(
                test, reference, target_image, target_label, keywords)

    drift = None
    if ref_emb is not None:
        drift = DriftReport(
            text=metrics.encoder_drift(emb.texts, ref_emb.texts).mean_distance,
            image=metrics.encoder_drift(emb.images, ref_emb.images).mean_distance,
            n_texts=int(emb.texts.shape[0]), n_images=int(emb.images.shape[0]),
        )
    return EvaluationReport(
        model=_model_description(subject),
        baseline_model=_model_description(reference) if reference is not None else None,
        test=test.summary(), goals=reports, utility=utility, baseline_utility=baseline_utility,
        backdoor=backdoor, targeted=targeted, drift=drift, seed=seed,
    )


def goals_from_manifest(manifest_path: str | Path) -> list[Goal]:
    return read_manifest(manifest_path).goal_objects()


def trigger_from_manifest(manifest_path: str | Path) -> BackdoorTrigger | None:
    """The backdoor's target label and patch, as the attack made them (None for other kinds)."""
    manifest = read_manifest(manifest_path)
    if manifest.trigger is None:
        return None
    return BackdoorTrigger(target=manifest.goals[0]["target"], spec=TriggerSpec.from_dict(manifest.trigger))


@dataclass
class ManifestTargets:
    """What an attack's manifest says to measure."""

    kind: str
    goals: list[Goal]
    target_image: TargetImage | None = None
    trigger: BackdoorTrigger | None = None
    target_label: str | None = None


def targets_from_manifest(manifest_path: str | Path) -> ManifestTargets:
    """Goals for Attacks I–III (with x* for Attack I); the target image and label for targeted
    poisoning; the trigger and its label for a backdoor (whose goals are not retrieval goals)."""
    manifest = read_manifest(manifest_path)
    goals = manifest.goal_objects()
    if manifest.kind == "single-image":
        return ManifestTargets(manifest.kind, goals, target_image=target_image_from_manifest(manifest_path))
    if manifest.kind == "targeted":
        return ManifestTargets(manifest.kind, [], target_image=target_image_from_manifest(manifest_path),
                               target_label=goals[0].target)
    if manifest.kind == "backdoor":
        return ManifestTargets(manifest.kind, [], trigger=trigger_from_manifest(manifest_path))
    return ManifestTargets(manifest.kind, goals)
