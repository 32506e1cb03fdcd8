"""`score --from-embeddings` against a plain numpy loop over the same files, in one run.

A clip-retrieval folder is written once (--files files of --rows pairs, --dim float16 dims,
unit vectors, metadata with a key and a url per row), read once so both contenders find it in
the page cache, and then scored by:

- numpy: for each file, memory-map both .npy files and take the row-wise dot in float32 blocks
  (no renormalisation, no checks, no metadata, nothing written): the floor of the arithmetic;
- clipguard: `score_from_embeddings` into a fresh folder: renormalised scores, bad-vector
  checks, the metadata read, a Parquet score file and a stats file per input file.

Pairs/s is pairs / wall seconds of each. clipguard's per-stage seconds come from its stats
files (read = metadata + opening, infer = the arithmetic, write = the Parquet file). clipguard
converts float16 with torch; importing torch costs about a second once per process, timed on
its own before both contenders run (neither is charged its imports), and printed.

Usage: python benchmarks/bench_from_embeddings.py [--files 4] [--rows 500000] [--dim 512] [--repeats 3]
Prints a table and writes bench-out/from_embeddings_benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipguard.scoring.from_embeddings import EmbeddingSource, score_from_embeddings
from clipguard.scoring.stats import folder_entries
from machine import cpu_name  # benchmarks/machine.py: run as a script, this folder is on the path

# The plain loop's block: 8192 rows (numpy's float16 conversion is as slow at any block size).
NUMPY_BLOCK_ROWS = 1 << 13


def write_folder(root: Path, files: int, rows: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(files):
        for side in ("img", "text"):
            v = rng.standard_normal((rows, dim), dtype=np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            np.save(root / f"{side}_emb" / f"{side}_emb_{i}.npy", v.astype(np.float16))
        keys = pa.array([f"{i:05d}{j:07d}" for j in range(rows)])
        urls = pa.array([f"https://img.example.com/{i}/{j}.jpg" for j in range(rows)])
        pq.write_table(pa.table({"key": keys, "caption": keys, "url": urls}), root / "metadata" / f"metadata_{i}.parquet")


def numpy_loop(root: Path, files: int) -> float:
    total = 0.0
    for i in range(files):
        image = np.load(root / "img_emb" / f"img_emb_{i}.npy", mmap_mode="r")
        text = np.load(root / "text_emb" / f"text_emb_{i}.npy", mmap_mode="r")
        for start in range(0, len(image), NUMPY_BLOCK_ROWS):
            a = np.asarray(image[start:start + NUMPY_BLOCK_ROWS], dtype=np.float32)
            b = np.asarray(text[start:start + NUMPY_BLOCK_ROWS], dtype=np.float32)
            total += float(np.einsum("ij,ij->i", a, b).sum())
    return total


def warm(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            path.read_bytes()




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("bench-out/from_embeddings"))
    args = parser.parse_args()
    pairs = args.files * args.rows
    shutil.rmtree(args.work, ignore_errors=True)
    data, out = args.work / "embeddings", args.work / "scores"
    write_folder(data, args.files, args.rows, args.dim)
    warm(data)
    started = time.perf_counter()
    import torch  # noqa: F401  (what score_from_embeddings imports on its first call)
    torch_import_seconds = time.perf_counter() - started

    rounds = []
    for _ in range(args.repeats):  # alternating, so that a busy moment on shared cores hits both
        started = time.perf_counter()
        numpy_loop(data, args.files)
        numpy_seconds = time.perf_counter() - started

        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        summary = score_from_embeddings(EmbeddingSource(data, "clip-retrieval"), out)
        clipguard_seconds = time.perf_counter() - started
        assert summary.pairs == pairs and summary.ok == pairs
        stages = {"read_seconds": 0.0, "infer_seconds": 0.0, "write_seconds": 0.0}
        for entry in folder_entries(out):
            seconds = json.loads((out / entry.where).read_text()).get("seconds", {})
            for key in stages:
                stages[key] += seconds.get(key, 0.0)
        rounds.append({
            "numpy_seconds": round(numpy_seconds, 3), "numpy_pairs_per_second": round(pairs / numpy_seconds),
            "clipguard_seconds": round(clipguard_seconds, 3), "clipguard_pairs_per_second": round(pairs / clipguard_seconds),
            "clipguard_stage_seconds": {k: round(v, 3) for k, v in stages.items()},
            "load_average_1min": round(os.getloadavg()[0], 2),
        })
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0)),
        "files": args.files, "rows_per_file": args.rows, "dim": args.dim, "pairs": pairs,
        "torch_import_seconds_once_per_process": round(torch_import_seconds, 3),
        "median_numpy_pairs_per_second": round(statistics.median(r["numpy_pairs_per_second"] for r in rounds)),
        "median_clipguard_pairs_per_second": round(statistics.median(r["clipguard_pairs_per_second"] for r in rounds)),
        "rounds": rounds,
    }
    print(f"{pairs:,} pairs, {args.dim} dims | cpu: {result['cpu']}, {result['cores']} cores")
    print(f"{'round':6}{'numpy s':>9}{'numpy pairs/s':>15}{'clipguard s':>13}{'clipguard pairs/s':>19}  clipguard stages (s)  load")
    for i, r in enumerate(rounds, 1):
        st = r["clipguard_stage_seconds"]
        print(f"{i:<6}{r['numpy_seconds']:9.2f}{r['numpy_pairs_per_second']:15,}{r['clipguard_seconds']:13.2f}"
              f"{r['clipguard_pairs_per_second']:19,}  read {st['read_seconds']:.2f} arithmetic {st['infer_seconds']:.2f}"
              f" write {st['write_seconds']:.2f}  {r['load_average_1min']}")
    print(f"median: numpy {result['median_numpy_pairs_per_second']:,} pairs/s, clipguard"
          f" {result['median_clipguard_pairs_per_second']:,} pairs/s; importing torch (once per process, in"
          f" neither figure): {torch_import_seconds:.2f} s")
    Path("bench-out").mkdir(exist_ok=True)
    Path("bench-out/from_embeddings_benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
