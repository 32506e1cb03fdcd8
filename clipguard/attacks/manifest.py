"""``poison_manifest.json``: what was injected where — the ground truth for calibration.

Format ``clipguard-poison-manifest/1``::

    {
      "format": "clipguard-poison-manifest/1",
      "kind": "single-label",
      "goals": [{"source": "sheep", "target": "aeroplane", "count": 20}],
      "rate": 0.004975,            # achieved φ = |Dp| / |D|, pairs
      "requested": {"rate": 0.005} or {"count": 20},
      "count": 20, "clean_pairs": 4000, "total_pairs": 4020, "seed": 0,
      "caption_source": "data" (or "templates", "blend", "data+templates"), "key_policy": "renumber",
      "labels": {"source": "auto", "keywords_file": null, "counts": {...}},
      "target_image": {"source_key", "source_shard", "class", "sha256", "poison_keys"} or null,
      "trigger": {"pattern", "size", "position"} or null,
      "evade": {"variant": "blend" | "nearest" | "clean-label" | "many-captions",
                "surrogate": name (nearest only)} or null,
      "input_shards": [url, ...],
      "output_shards": [{"name", "file", "clean", "poisons"}, ...],
      "poison_keys": [...],        # exactly the injected samples' keys, in output order
      "poisons": [{"key", "shard", "goal", "caption", "caption_origin" ("data", "template", "blend"),
                   "text_source": {"shard", "key", "output_key"} or null,
                   "image_source": {"shard", "key", "output_key", "class"},
                   "image_sha256", "triggered"}, ...]
    }

Source keys are keys of the clean input; ``output_key`` is where that clean sample sits in the
poisoned output (they differ under ``renumber``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clipguard.attacks.goals import AttackError, Goal

MANIFEST_NAME = "poison_manifest.json"
MANIFEST_FORMAT = "clipguard-poison-manifest/1"


@dataclass(frozen=True)
class SourceRef:
    shard: str
    key: str
    output_key: str
    label: str | None = None


@dataclass(frozen=True)
class PoisonRecord:
    key: str
    shard: str
    goal: str
    caption: str
    caption_origin: str  # "data" or "template"
    text_source: SourceRef | None
    image_source: SourceRef
    image_sha256: str
    triggered: bool = False


@dataclass
class PoisonManifest:
    kind: str
    goals: list[dict[str, Any]]
    rate: float
    requested: dict[str, float | int]
    count: int
    clean_pairs: int
    seed: int
    caption_source: str
    key_policy: str
    labels: dict[str, Any]
    input_shards: list[str]
    output_shards: list[dict[str, Any]]
    poisons: list[PoisonRecord]
    target_image: dict[str, Any] | None = None
    trigger: dict[str, Any] | None = None
    evade: dict[str, Any] | None = None  # None for the plain attacks
    format: str = MANIFEST_FORMAT

    @property
    def total_pairs(self) -> int:
        return self.clean_pairs + self.count

    @property
    def poison_keys(self) -> list[str]:
        return [p.key for p in self.poisons]

    def goal_objects(self) -> list[Goal]:
        return [Goal(g["source"], g["target"]) for g in self.goals]

    def to_dict(self) -> dict[str, Any]:
        data = {
            "format": self.format,
            "kind": self.kind,
            "goals": self.goals,
            "rate": self.rate,
            "requested": self.requested,
            "count": self.count,
            "clean_pairs": self.clean_pairs,
            "total_pairs": self.total_pairs,
            "seed": self.seed,
            "caption_source": self.caption_source,
            "key_policy": self.key_policy,
            "labels": self.labels,
            "target_image": self.target_image,
            "trigger": self.trigger,
            "evade": self.evade,
            "input_shards": self.input_shards,
            "output_shards": self.output_shards,
            "poison_keys": self.poison_keys,
            "poisons": [asdict(p) for p in self.poisons],
        }
        return data

    def write(self, out_dir: Path) -> Path:
        path = Path(out_dir) / MANIFEST_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


def _source(data: dict | None) -> SourceRef | None:
    return SourceRef(**data) if data else None


def read_manifest(path: str | Path) -> PoisonManifest:
    """Read a poison manifest (a file, or the folder of poisoned shards that holds one)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AttackError(f"poison manifest {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AttackError(f"poison manifest {path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise AttackError(f"{path} is not a clipguard poison manifest (format {MANIFEST_FORMAT})")
    try:
        poisons = [
            PoisonRecord(**{**p, "text_source": _source(p["text_source"]), "image_source": _source(p["image_source"])})
            for p in data["poisons"]
        ]
        return PoisonManifest(
            kind=data["kind"], goals=data["goals"], rate=data["rate"], requested=data["requested"],
            count=data["count"], clean_pairs=data["clean_pairs"], seed=data["seed"],
            caption_source=data["caption_source"], key_policy=data["key_policy"], labels=data["labels"],
            input_shards=data["input_shards"], output_shards=data["output_shards"], poisons=poisons,
            target_image=data.get("target_image"), trigger=data.get("trigger"), evade=data.get("evade"),
        )
    except (KeyError, TypeError) as exc:
        raise AttackError(f"poison manifest {path} is incomplete: {exc}") from exc
