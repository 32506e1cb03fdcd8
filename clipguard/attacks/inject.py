"""Mix poisons into the clean shards: seeded positions, keys in the data's own style, tar output.

Placement: the poisons take ``n`` of the ``N + n`` output positions, drawn uniformly with the seed,
so they spread over the shards in proportion to shard size, and land inside shards, not at
their ends. Each output shard holds its input shard's clean samples in their order, with the
poisons that fall among them. Empty input shards stay empty.

Keys (``KeyPolicy``):
- ``renumber`` (default): every output shard is numbered afresh in the input's own style
  (same prefix, same width, starting at the shard's first key), the way img2dataset numbers a
  scrape. Poisons then sit in key order among clean samples and nothing about their keys stands
  out. A clean sample keeps every byte except the ``"key"`` value inside its json metadata,
  which follows the tar key as img2dataset's does (the rest of that json is unchanged, byte for
  byte, where its formatting can be reproduced).
- ``keep``: clean samples keep their keys and every byte. Poisons get unused keys of the same
  form (the next free numbers of their shard). With contiguous clean keys those numbers lie
  past the shard's last key, so a defender who compares key order with tar order can find them:
  the price of injecting after the scrape.

Shards are written deterministically: fixed member mtime, owner and mode, fields in sorted
order (webdataset's TarWriter), each shard through a temporary name and then renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import webdataset as wds

from clipguard.attacks.goals import AttackError
from clipguard.attacks.index import CleanIndex
from clipguard.attacks.plan import PoisonPlan
from clipguard.attacks.trigger import TriggerSpec, stamp_image_bytes
from clipguard.data.tarstream import ShardReport, iter_samples

TAR_MTIME = 0
TAR_OWNER = "clipguard"
TAR_MODE = 0o444
# json fields that describe a caption rather than its image: they follow the poison's caption.
CAPTION_FIELDS = ("caption", "text", "keyword", "template")
# json fields that hash the image bytes: recomputed when a trigger changes the bytes.
IMAGE_HASH_FIELDS = ("sha256",)
_NUMBERED_KEY = re.compile(r"^(?P<stem>.*?)(?P<number>\d+)$")


class KeyPolicy(str, Enum):
    renumber = "renumber"
    keep = "keep"


@dataclass(frozen=True)
class Slot:
    """One output sample: a clean one (``offset`` in its input shard) or poison ``poison``."""

    key: str
    offset: int | None = None
    poison: int | None = None


@dataclass
class OutputShard:
    name: str
    path: Path
    slots: list[Slot]

    @property
    def poisons(self) -> int:
        return sum(slot.poison is not None for slot in self.slots)

    @property
    def clean(self) -> int:
        return len(self.slots) - self.poisons


# ------------------------------------------------------------------------------------ placement


def place_poisons(shard_sizes: list[int], count: int, rng: np.random.Generator) -> list[list[tuple[int, int]]]:
    """Per shard, sorted (offset, poison number): the poison goes before clean sample ``offset``
    (``offset == size`` means after the shard's last clean sample)."""
    total_clean = sum(shard_sizes)
    if total_clean == 0:
        raise AttackError("the clean shards hold no samples to hide poisons among")
    positions = np.sort(rng.choice(total_clean + count, size=count, replace=False))
    order = rng.permutation(count)  # which poison takes which position: not by goal or source
    starts = np.cumsum([0] + list(shard_sizes))
    last_nonempty = max(i for i, size in enumerate(shard_sizes) if size > 0)
    placements: list[list[tuple[int, int]]] = [[] for _ in shard_sizes]
    for rank, position in enumerate(positions):
        clean_before = int(position) - rank
        if clean_before >= total_clean:
            shard, offset = last_nonempty, shard_sizes[last_nonempty]
        else:
            shard = int(np.searchsorted(starts, clean_before, side="right") - 1)
            offset = clean_before - int(starts[shard])
        placements[shard].append((offset, int(order[rank])))
    return placements


# ----------------------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class KeyStyle:
    stem: str
    width: int
    numbers: tuple[int, ...]

    def format(self, number: int) -> str:
        return f"{self.stem}{number:0{self.width}d}"

    def fits(self, number: int) -> bool:
        return len(str(number)) <= self.width


def key_style(keys: list[str]) -> KeyStyle | None:
    """The shared ``stem + zero-padded number`` form of a shard's keys, or None if they have none."""
    parsed = [_NUMBERED_KEY.match(key) for key in keys]
    if not keys or not all(parsed):
        return None
    stems = {m["stem"] for m in parsed}
    widths = {len(m["number"]) for m in parsed}
    if len(stems) != 1 or len(widths) != 1:
        return None
    return KeyStyle(stem=stems.pop(), width=widths.pop(), numbers=tuple(int(m["number"]) for m in parsed))


def _shard_keys(index: CleanIndex) -> list[list[str]]:
    keys: list[list[str]] = [[] for _ in index.shards]
    for sample in index.samples:
        keys[sample.shard].append(sample.key)
    return keys


def layout(index: CleanIndex, placements: list[list[tuple[int, int]]], policy: KeyPolicy,
           out_dir: Path, rng: np.random.Generator) -> list[OutputShard]:
    shard_keys = _shard_keys(index)
    assign = _renumbered_keys if policy is KeyPolicy.renumber else _kept_keys
    shards = []
    used: set[str] = set(k for keys in shard_keys for k in keys) if policy is KeyPolicy.keep else set()
    for number, shard in enumerate(index.shards):
        order = _merge(len(shard_keys[number]), placements[number])
        keys = assign(shard.url, shard_keys[number], order, used, rng)
        slots = [Slot(key=key, offset=offset, poison=poison) for key, (offset, poison) in zip(keys, order)]
        shards.append(OutputShard(name=shard.name, path=out_dir / f"{shard.name}.tar", slots=slots))
    all_keys = [slot.key for shard in shards for slot in shard.slots]
    if len(set(all_keys)) != len(all_keys):
        raise AttackError(
            "renumbering the shards in their own key style makes two shards share keys (are keys "
            "numbered across shards rather than per shard?); pass --keys keep"
        )
    return shards


def _merge(clean: int, poisons: list[tuple[int, int]]) -> list[tuple[int | None, int | None]]:
    order: list[tuple[int | None, int | None]] = []
    pending = sorted(poisons)
    next_poison = 0
    for offset in range(clean + 1):
        while next_poison < len(pending) and pending[next_poison][0] == offset:
            order.append((None, pending[next_poison][1]))
            next_poison += 1
        if offset < clean:
            order.append((offset, None))
    return order


def _renumbered_keys(url: str, clean_keys: list[str], order, used: set[str], rng) -> list[str]:
    if not order:
        return []
    style = key_style(clean_keys)
    if style is None or any(b <= a for a, b in zip(style.numbers, style.numbers[1:])):
        raise AttackError(
            f"shard {url}: keys are not one increasing 'prefix + number' sequence "
            f"(e.g. {clean_keys[:2]}), so they cannot be renumbered in their own style; pass --keys keep"
        )
    first = style.numbers[0]
    if not style.fits(first + len(order) - 1):
        raise AttackError(f"shard {url}: {len(order)} samples do not fit {style.width}-digit keys; pass --keys keep")
    return [style.format(first + i) for i in range(len(order))]


def _kept_keys(url: str, clean_keys: list[str], order, used: set[str], rng: np.random.Generator) -> list[str]:
    style = key_style(clean_keys)
    next_number = max(style.numbers) + 1 if style else 0
    keys = []
    for offset, _ in order:
        if offset is not None:
            keys.append(clean_keys[offset])
            continue
        if style is not None:
            while style.format(next_number) in used:
                next_number += 1
            if not style.fits(next_number):
                raise AttackError(f"shard {url}: no free {style.width}-digit key left for a poison")
            key = style.format(next_number)
        else:
            key = _random_key_like(clean_keys[0] if clean_keys else "0" * 9, used, rng)
        used.add(key)
        keys.append(key)
    return keys


def _random_key_like(example: str, used: set[str], rng: np.random.Generator) -> str:
    alphabet = "0123456789abcdef"
    while True:
        key = "".join(alphabet[i] for i in rng.integers(0, 16, max(8, len(example))))
        if key not in used:
            return key


# ------------------------------------------------------------------------------------ json edits


_STYLES = [
    {"sort_keys": sort, "ensure_ascii": ascii_, "indent": indent, "separators": sep}
    for sort in (False, True)
    for ascii_ in (True, False)
    for indent, sep in ((None, None), (None, (",", ":")), (2, None), (4, None))
]


def _json_style(raw: bytes, meta: dict) -> dict | None:
    """The json.dumps settings that reproduce ``raw`` exactly, if any do."""
    for style in _STYLES:
        text = json.dumps(meta, **style)
        for candidate in (text, text + "\n"):
            if candidate.encode("utf-8") == raw:
                return {**style, "_newline": candidate.endswith("\n")}
    return None


def edit_json(raw: bytes, updates: dict) -> bytes:
    """Set ``updates`` in a json object, keeping the original's formatting where it can be found."""
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return raw
    if not isinstance(meta, dict):
        return raw
    changes = {k: v for k, v in updates.items() if k in meta and meta[k] != v}
    if not changes:
        return raw
    style = _json_style(raw, meta)
    if style is None and set(changes) == {"key"} and isinstance(meta["key"], str):
        # Unknown formatting: replace the one value in place rather than re-serialise everything.
        pattern = re.compile(rb'("key"\s*:\s*)' + re.escape(json.dumps(meta["key"]).encode()))
        edited, replaced = pattern.subn(lambda m: m.group(1) + json.dumps(changes["key"]).encode(), raw, count=1)
        if replaced:
            return edited
    meta.update(changes)
    style = dict(style or {"sort_keys": False, "ensure_ascii": True, "indent": None, "separators": None,
                           "_newline": False})
    newline = style.pop("_newline")
    return (json.dumps(meta, **style) + ("\n" if newline else "")).encode("utf-8")


def _json_fields(raw: bytes | None, names: tuple[str, ...]) -> dict:
    if raw is None:
        return {}
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return {k: meta[k] for k in names if isinstance(meta, dict) and k in meta}


# ---------------------------------------------------------------------------------- poison bytes


def poison_fields(plan: PoisonPlan, fetched: dict[str, dict[str, bytes]], trigger: TriggerSpec | None) -> dict[str, bytes]:
    """The poison's fields, shaped like its image source's sample (same extensions).

    Image: the source's bytes (stamped when the plan says so). Caption: ``txt`` and/or the json
    ``caption``. json: the image source's metadata, which describes the image it copies (class,
    ids, attributes), with the caption-level fields of the caption source.
    """
    source = fetched[plan.image_source.key]
    fields = dict(source)
    image_bytes = source[plan.image_source.image_field]
    if plan.stamp_trigger:
        image_bytes = stamp_image_bytes(image_bytes, trigger or TriggerSpec())
    fields[plan.image_source.image_field] = image_bytes
    caption_bytes = plan.caption.encode("utf-8")
    if "txt" in fields or "json" not in fields:
        fields["txt"] = caption_bytes
    if "json" in fields:
        updates = {"caption": plan.caption}
        if plan.text_source is not None:
            text_json = fetched[plan.text_source.key].get("json")
            updates.update({k: v for k, v in _json_fields(text_json, CAPTION_FIELDS).items() if k != "caption"})
        elif plan.caption_word is not None:
            updates["keyword"] = plan.caption_word
        if plan.stamp_trigger:
            updates.update({k: hashlib.sha256(image_bytes).hexdigest() for k in IMAGE_HASH_FIELDS})
        fields["json"] = edit_json(fields["json"], updates)
    return fields


# --------------------------------------------------------------------------------------- writing


def prepare_out_dir(out_dir: Path, index: CleanIndex, overwrite: bool, manifest_name: str) -> None:
    out_dir = Path(out_dir)
    for shard in index.shards:
        if not shard.is_remote and Path(shard.url).resolve().parent == out_dir.resolve():
            raise AttackError(f"--out {out_dir} is the folder of the clean shards; write poisoned shards elsewhere")
    if out_dir.exists() and not out_dir.is_dir():
        raise AttackError(f"--out {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = list(out_dir.glob("*.tar")) + list(out_dir.glob("*.tar.tmp")) + [out_dir / manifest_name]
    existing = [p for p in ours if p.exists()]
    if existing and not overwrite:
        raise AttackError(f"{out_dir} already holds {existing[0].name} (and maybe more); pass --overwrite to replace")
    for path in existing:
        path.unlink()


def write_shards(index: CleanIndex, shards: list[OutputShard], poisons: list[dict[str, bytes]],
                 policy: KeyPolicy, progress: Callable[[int], None] | None = None) -> None:
    for number, (shard, output) in enumerate(zip(index.shards, shards)):
        clean = iter_samples(shard, ShardReport(shard=shard.name, url=shard.url))
        tmp = output.path.with_name(output.path.name + ".tmp")
        with open(tmp, "wb") as stream:
            writer = wds.TarWriter(stream, user=TAR_OWNER, group=TAR_OWNER, mode=TAR_MODE,
                                   encoder=False, mtime=TAR_MTIME)
            for slot in output.slots:
                if slot.poison is not None:
                    fields = dict(poisons[slot.poison])
                else:
                    raw = next(clean)
                    fields = dict(raw.fields)
                    if policy is KeyPolicy.keep or raw.key == slot.key:
                        writer.write({"__key__": slot.key, **fields})
                        continue
                if "json" in fields:
                    fields["json"] = edit_json(fields["json"], {"key": slot.key})
                writer.write({"__key__": slot.key, **fields})
            writer.close()
        if next(clean, None) is not None:
            raise AttackError(f"shard {shard.url} changed while the attack ran (more samples than indexed)")
        os.replace(tmp, output.path)
        if progress is not None:
            progress(number + 1)
