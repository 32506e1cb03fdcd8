"""The audit's counting pass (`audit.counting`: distinct ids, distinct counts per group, shared
patch signatures) through partitions on disk against the in-memory code of an earlier commit,
each in its own process, on the same synthetic hashes.

Each process makes the same data from one seed: ``--pairs`` pairs whose images and captions are
drawn with reuse (about 0.6 distinct images and 0.7 distinct captions a pair), 8 patch
signatures an image (10% of tiles empty), 1,000 signatures planted on 20 images each, and random
caption and image classes. Then, stage by stage, what the audit's pipeline does with them: number
the captions and the images, count the distinct captions behind each image and images behind
each caption, group the patch signatures shared by two or more images, count the (caption class,
image class) cells in distinct groups (`classes.cell_table`) and find each group's own captions'
class (`classes.own_classes`, `pipeline._own_classes` before; both one `np.unique` of a combined
code since 2026-12-04, of stacked columns before; both partitioned by ranges of image groups
where the checkout's `cell_table` takes a work folder). For each stage it reports the seconds (a run
without tracemalloc) and the Python-traced peak above the data held (a second run with it:
numpy's arrays are traced), and a digest of every output, which must be equal across versions.

A version with `clipguard.audit.counting` runs it with ``--partition-rows`` (default the
audit's); one without runs the code its pipeline ran (`grouping.factorize_codes`,
`grouping.distinct_per_group`, `detect._patch_units`).

Usage: python benchmarks/bench_audit_counting.py [--pairs 10000000] [--baseline 6fa69ba]
Prints a table and writes bench-out/audit_counting_benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from bench_audit_memory import REPO, child_json, tree_of  # this folder is on the path
from machine import run_header

CHILD = r"""
import hashlib, json, sys, time, tracemalloc
from pathlib import Path
from types import SimpleNamespace
import numpy as np
pairs, tree, work, partition_rows, traced = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
import clipguard
assert clipguard.__file__.startswith(tree), (clipguard.__file__, tree)
try:
    from clipguard.audit import counting
except ImportError:
    counting = None
from clipguard.audit import detect, grouping
import inspect
from clipguard.audit.classes import cell_table
try:
    from clipguard.audit.classes import own_classes  # partitioned by image group since 2026-12-04
except ImportError:
    from clipguard.audit.pipeline import _own_classes as own_classes
parted = "work" in inspect.signature(cell_table).parameters

rng = np.random.default_rng(0)
images, captions = int(pairs * 0.75), int(pairs * 0.9)
image_of = rng.integers(0, images, size=pairs)
image_hash = rng.integers(0, 2**64, size=images, dtype=np.uint64)[image_of]
caption_hash = rng.integers(0, 2**64, size=captions, dtype=np.uint64)[rng.integers(0, captions, size=pairs)]
signatures = rng.integers(1, 2**64, size=(images, 8), dtype=np.uint64)
signatures[rng.random(signatures.shape) < 0.1] = 0
planted = rng.integers(1, 2**64, size=1_000, dtype=np.uint64)
signatures[rng.integers(0, images, size=20_000), 7] = np.repeat(planted, 20)
patches = signatures[image_of]
del signatures, image_of
caption_class = np.where(rng.random(pairs) < 0.1, -1, rng.integers(0, 10, size=pairs))
image_class = rng.integers(0, 10, size=pairs)
strong = rng.random(pairs) < 0.5

if counting is not None:
    ids = lambda codes: counting.distinct_ids(codes, work, None, partition_rows)
    distinct = lambda group, item, groups: counting.distinct_counts(group, item, groups, work, None, partition_rows)
    units = lambda patches, group: counting.patch_units(patches, group, work, None, partition_rows)
else:
    ids = grouping.factorize_codes
    distinct = grouping.distinct_per_group
    units = lambda patches, group: detect._patch_units(SimpleNamespace(patches=patches, image_group=group,
                                                                       caption_class=np.zeros(len(group), np.int64)))

def digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]

stages = {}
if traced:
    tracemalloc.start()
def stage(name, fn):
    if traced:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    out = fn()
    stages[name] = {"seconds": time.perf_counter() - started}
    if traced:
        stages[name]["traced_peak_mib"] = (tracemalloc.get_traced_memory()[1] - before) / 2**20
    return out

caption_id, n_captions = stage("caption ids", lambda: ids(caption_hash))
image_id, n_images = stage("image ids", lambda: ids(image_hash))
fan_in = stage("captions per image", lambda: distinct(image_id, caption_id, n_images))
fan_out = stage("images per caption", lambda: distinct(caption_id, image_id, n_captions))
found = stage("shared patches", lambda: units(patches, image_id))
on_disk = (work, None, partition_rows) if parted else ()
cells = stage("class cells", lambda: cell_table(caption_class, image_class, 10, image_id, strong, *on_disk).observed)
own = stage("own classes", lambda: own_classes(image_id, caption_id, caption_class, 10, *on_disk))
own = own if len(own) == pairs else own[image_id]  # per image group since 2026-12-04, per pair before
shared = [np.concatenate([np.r_[len(unit)], *unit]) for unit in found]
print(json.dumps({"pairs": pairs, "stages": stages, "images": n_images, "captions": n_captions,
                  "shared_signatures": len(found),
                  "digests": {"caption ids": digest(caption_id), "image ids": digest(image_id),
                              "captions per image": digest(fan_in), "images per caption": digest(fan_out),
                              "shared patches": digest(*shared) if shared else "",
                              "class cells": digest(cells), "own classes": digest(own)}}))
"""


def run_child(tree: Path, pairs: int, work: Path, partition_rows: int, traced: bool) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    try:
        return child_json(tree, CHILD, [str(pairs), str(tree / "clipguard"), str(work), str(partition_rows),
                                        "1" if traced else "0"], "the counting")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    sys.path.insert(0, str(REPO))
    from clipguard.audit.counting import PARTITION_ROWS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10_000_000)
    parser.add_argument("--partition-rows", type=int, default=PARTITION_ROWS)
    parser.add_argument("--baseline", action="append", default=[], help="a commit to compare (repeatable)")
    parser.add_argument("--work", type=Path, default=Path("bench-out/audit_counting"))
    parser.add_argument("--out", type=Path, default=Path("bench-out/audit_counting_benchmark.json"))
    args = parser.parse_args()
    work = args.work.resolve()
    runs = {}
    for name, tree in [("checkout", REPO), *((c, tree_of(c, work)) for c in args.baseline)]:
        timed = run_child(tree, args.pairs, work / "runs", args.partition_rows, traced=False)
        traced = run_child(tree, args.pairs, work / "runs", args.partition_rows, traced=True)
        if traced["digests"] != timed["digests"]:
            raise SystemExit(f"{name}: the traced run's outputs differ from the timed run's")
        for stage, figures in timed["stages"].items():
            figures["traced_peak_mib"] = traced["stages"][stage]["traced_peak_mib"]
        runs[name] = timed
    first = next(iter(runs.values()))
    equal = {name: r["digests"] == first["digests"] for name, r in runs.items()}
    result = {**run_header(REPO), "pairs": args.pairs, "partition_rows": args.partition_rows, "runs": runs, "outputs_equal": equal}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.pairs:,} pairs, partitions of about {args.partition_rows:,} rows | cpu: {result['cpu']}, "
          f"{result['cores']} cores | {first['images']:,} images, {first['captions']:,} captions, "
          f"{first['shared_signatures']:,} shared signatures")
    print(f"{'stage':>20}" + "".join(f"{name + ' s':>16}{'peak MiB':>10}" for name in runs))
    for stage in first["stages"]:
        print(f"{stage:>20}" + "".join(f"{r['stages'][stage]['seconds']:16.1f}{r['stages'][stage]['traced_peak_mib']:10.0f}"
                                       for r in runs.values()))
    print("outputs equal to the checkout's: " + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in equal.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
