"""The audit's goal-discovery tests (`audit.detect.detect`) on web-sized synthetic tables: the
checkout against an earlier commit, each in its own process, on the same tables.

Each process makes the same tables from one seed: ``--pairs`` pairs over 10 classes, images
reused (about 0.75 distinct images a pair, three to a near-duplicate group at 5%), captions
reused (0.9 distinct a pair), 10% of captions without a class, 3% naming a wrong one, and one
planted fan-in (an aeroplane image behind 40 sheep captions), so that the tests have something to
find. It reports each test's seconds, the peak resident memory above the tables (the kernel's
high-water mark, reset once the tables are built: tracemalloc would slow the old code's Python
loop by many times) and the findings (kind, goal, observed, rows), which must be equal across
versions.

Usage: python benchmarks/bench_audit_detect.py [--pairs 1000000] [--baseline 6fa69ba]
Prints a table and writes bench-out/audit_detect_benchmark.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_audit_memory import REPO, child_json, tree_of  # this folder is on the path
from machine import run_header

CHILD = r"""
import hashlib, json, sys, time
import numpy as np
pairs, tree = int(sys.argv[1]), sys.argv[2]
import clipguard
assert clipguard.__file__.startswith(tree), (clipguard.__file__, tree)
from clipguard.audit.classes import cell_table
from clipguard.audit.detect import AuditTables, DetectConfig, detect
from clipguard.audit.timing import StageClock

classes = [f"class{i}" for i in range(10)]
rng = np.random.default_rng(0)
images, captions = int(pairs * 0.75), int(pairs * 0.9)
image_id = rng.integers(0, images, size=pairs)
merged = rng.random(images) < 0.05
group_of = np.arange(images)
group_of[merged] = group_of[merged] // 3 * 3  # a few near-duplicate groups of up to three images
group_of = np.unique(group_of, return_inverse=True)[1]
image_class_of = rng.integers(0, 10, size=group_of.max() + 1)
image_group = group_of[image_id]
image_class = image_class_of[image_group]
caption_id = rng.integers(0, captions, size=pairs)
caption_class = np.where(rng.random(pairs) < 0.03, rng.integers(0, 10, size=pairs), image_class)
caption_class[rng.random(pairs) < 0.1] = -1
# The planted goal: image 0's group behind 40 new sheep captions.
planted = np.arange(pairs - 40, pairs)
image_class[image_group == image_group[0]] = 1
image_id[planted], image_group[planted], image_class[planted] = image_id[0], image_group[0], 1
caption_id[planted] = captions + np.arange(40)
caption_class[planted] = 7
caption_group = caption_id // 2
strong = caption_class != image_class
t = AuditTables(classes=classes, caption_class=caption_class, image_class=image_class,
                caption_texts=lambda rows: [f"caption {i}" for i in caption_id[rows]], caption_id=caption_id,
                image_id=image_id, image_group=image_group, caption_group=caption_group, strong_mismatch=strong,
                cells=cell_table(caption_class, image_class, len(classes), image_group, strong),
                pair_similarity=rng.random(pairs).astype(np.float32))
def status(field):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) for line in lines if line.startswith(field + ":")) / 1024

with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # resets VmHWM to the resident memory now
before = status("VmRSS")
clock = StageClock()
started = time.perf_counter()
found = detect(t, DetectConfig(), clock).findings
seconds = time.perf_counter() - started
peak = status("VmHWM") - before
h = hashlib.sha256()
for f in found:
    h.update(f"{f.kind}|{f.goal}|{f.observed}|".encode())
    h.update(np.asarray(f.rows, np.int64).tobytes())
print(json.dumps({"pairs": pairs, "seconds": seconds, "stage_seconds": clock.seconds, "peak_rss_above_tables_mib": peak,
                  "image_groups": int(image_group.max()) + 1, "findings": [[f.kind, f.goal, f.observed] for f in found],
                  "findings_digest": h.hexdigest()[:16]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--baseline", action="append", default=[], help="a commit to compare (repeatable)")
    parser.add_argument("--work", type=Path, default=Path("bench-out/audit_detect"))
    parser.add_argument("--out", type=Path, default=Path("bench-out/audit_detect_benchmark.json"))
    args = parser.parse_args()
    work = args.work.resolve()
    runs = {}
    for name, tree in [("checkout", REPO), *((c, tree_of(c, work)) for c in args.baseline)]:
        runs[name] = child_json(tree, CHILD, [str(args.pairs), str(tree / "clipguard")], "detect")
    first = next(iter(runs.values()))
    equal = {name: r["findings_digest"] == first["findings_digest"] for name, r in runs.items()}
    result = {**run_header(REPO), "pairs": args.pairs, "runs": runs, "findings_equal": equal}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.pairs:,} pairs, {first['image_groups']:,} image groups | cpu: {result['cpu']}, {result['cores']} cores")
    print(f"findings: {first['findings']}")
    print(f"{'stage':>36}" + "".join(f"{name + ' s':>16}" for name in runs))
    for stage in first["stage_seconds"]:
        print(f"{stage:>36}" + "".join(f"{r['stage_seconds'][stage]:16.1f}" for r in runs.values()))
    print(f"{'all tests':>36}" + "".join(f"{r['seconds']:16.1f}" for r in runs.values()))
    print(f"{'peak RSS above tables MiB':>36}" + "".join(f"{r['peak_rss_above_tables_mib']:16.0f}" for r in runs.values()))
    print("findings equal to the checkout's: " + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in equal.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
