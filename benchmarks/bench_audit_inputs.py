"""What reading an audit's input costs the driver (`audit.inputs.load_pairs`): the checkout against
earlier commits, each in its own process, on the folder `bench_audit_memory.py` writes.

Each process loads the pairs once to warm what any run keeps (BLAS buffers, arrow's pools,
imports), hands freed memory back (arrow's pool, malloc_trim), then loads them again and reports
the seconds, the Python-traced peak and what is still held (tracemalloc), and the anonymous memory
held above the warm state once freed memory is handed back: what the audit keeps per pair before
its neighbour search. A version whose `load_pairs` takes a work folder (the audit's, since
2026-12-04) writes the columns there, memory-mapped: their pages, once read, are counted apart
(file pages: page cache the OS can drop, not the driver's own).

Usage: python benchmarks/bench_audit_inputs.py [--pairs 200000] [--baseline f65099d]
Prints a table and writes bench-out/audit_inputs_benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from bench_audit_memory import CLASSES, REPO, child_json, scored_folder, tree_of  # this folder is on the path
from machine import run_header

CHILD = r"""
import ctypes, gc, inspect, json, sys, tempfile, time, tracemalloc
tree = sys.argv[3]
import numpy as np, pyarrow as pa
import clipguard
assert clipguard.__file__.startswith(tree), (clipguard.__file__, tree)
from clipguard.audit.inputs import load_pairs

def rss_mib(kind):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(kind + ":")) / 1024

anon_mib = lambda: rss_mib("RssAnon")

def hand_back():
    gc.collect(); pa.default_memory_pool().release_unused(); ctypes.CDLL("libc.so.6").malloc_trim(0)

keywords = json.loads(sys.argv[4])
# Since 2026-12-04 the columns can go to files, memory-mapped: the audit passes its working folder.
spill = {"work": tempfile.mkdtemp(dir=sys.argv[5])} if "work" in inspect.signature(load_pairs).parameters else {}
load_pairs(sys.argv[1], sys.argv[2], keywords, **spill)
hand_back()
warm, warm_file = anon_mib(), rss_mib("RssFile")
tracemalloc.start()
started = time.perf_counter()
pairs = load_pairs(sys.argv[1], sys.argv[2], keywords, **spill)
seconds = time.perf_counter() - started
held, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
hand_back()
np.asarray(pairs.caption_hash).sum(), np.asarray(pairs.patches).sum() if pairs.patches is not None else 0  # pages in: as a pass would
print(json.dumps({"pairs": len(pairs), "seconds": seconds, "traced_peak_mib": peak / 2**20,
                  "traced_held_mib": held / 2**20, "anon_held_mib": anon_mib() - warm,
                  "file_pages_mib": rss_mib("RssFile") - warm_file, "columns_on_disk": bool(spill)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200_000)
    parser.add_argument("--parts", type=int, default=8)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--baseline", action="append", default=[], help="a commit to compare (repeatable)")
    parser.add_argument("--work", type=Path, default=Path("bench-out/audit_memory"))
    parser.add_argument("--out", type=Path, default=Path("bench-out/audit_inputs_benchmark.json"))
    args = parser.parse_args()
    work = args.work.resolve()
    data, scores = scored_folder(work, args.pairs, args.parts, args.dim)  # the same folder as bench_audit_memory's
    keywords = json.dumps({c: [c] for c in CLASSES})
    runs = {}
    for name, tree in [("checkout", REPO), *((c, tree_of(c, work)) for c in args.baseline)]:
        spill = work / "pair-columns"
        shutil.rmtree(spill, ignore_errors=True)
        spill.mkdir(parents=True)
        runs[name] = child_json(tree, CHILD, [str(scores), str(data), str(tree / "clipguard"), keywords, str(spill)],
                                "load_pairs")
        shutil.rmtree(spill, ignore_errors=True)
    result = {**run_header(REPO), "pairs": args.pairs, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.pairs:,} pairs | cpu: {result['cpu']}, {result['cores']} cores")
    print(f"{'version':>10}{'seconds':>9}{'traced peak MiB':>17}{'traced held':>13}{'anon held MiB':>15}{'bytes/pair':>12}"
          f"{'file pages MiB':>16}")
    for name, r in runs.items():
        print(f"{name:>10}{r['seconds']:9.1f}{r['traced_peak_mib']:17.1f}{r['traced_held_mib']:13.1f}"
              f"{r['anon_held_mib']:15.0f}{r['anon_held_mib'] * 2**20 / r['pairs']:12.0f}{r.get('file_pages_mib', 0):16.0f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
