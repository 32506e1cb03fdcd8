"""`score --from-embeddings` against a plain numpy loop over the same files, in one run.

A clip-retrieval folder is written once (--files files of --rows pairs, --dim float16 dims,
unit vectors, metadata with a key and a url per row), read once so both contenders find it in
the page cache, and then scored by:

- numpy: for each file, memory-map both .npy files and take the row-wise dot in float32 blocks
  (no renormalisation, no checks, no metadata, nothing written): the floor of the arithmetic;
- clipguard: `score_from_embeddings` into a fresh folder: renormalised scores, bad-vector
  checks, the metadata read, a Parquet score file and a stats file per input file.

Pairs/s is pairs / wall seconds of each. clipguard's per-stage seconds come from its stats
files (read = metadata + opening, infer = the arithmetic, write = the Parquet file).

Usage: python benchmarks/bench_from_embeddings.py [--files 4] [--rows 500000] [--dim 512]
Prints a table and writes bench-out/from_embeddings_benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipguard.scoring.from_embeddings import BLOCK_ROWS, EmbeddingSource, score_from_embeddings
from clipguard.scoring.stats import folder_entries


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
        for start in range(0, len(image), BLOCK_ROWS):
            a = np.asarray(image[start:start + BLOCK_ROWS], dtype=np.float32)
            b = np.asarray(text[start:start + BLOCK_ROWS], dtype=np.float32)
            total += float(np.einsum("ij,ij->i", a, b).sum())
    return total


def warm(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            path.read_bytes()


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--work", type=Path, default=Path("bench-out/from_embeddings"))
    args = parser.parse_args()
    pairs = args.files * args.rows
    shutil.rmtree(args.work, ignore_errors=True)
    data, out = args.work / "embeddings", args.work / "scores"
    write_folder(data, args.files, args.rows, args.dim)
    warm(data)

    started = time.perf_counter()
    numpy_loop(data, args.files)
    numpy_seconds = time.perf_counter() - started

    started = time.perf_counter()
    summary = score_from_embeddings(EmbeddingSource(data, "clip-retrieval"), out)
    clipguard_seconds = time.perf_counter() - started
    assert summary.pairs == pairs and summary.ok == pairs

    stages = {"read_seconds": 0.0, "infer_seconds": 0.0, "write_seconds": 0.0}
    for entry in folder_entries(out):
        seconds = json.loads((out / entry.where).read_text()).get("seconds", {})
        for key in stages:
            stages[key] += seconds.get(key, 0.0)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_name(),
        "cores": len(__import__("os").sched_getaffinity(0)),
        "files": args.files, "rows_per_file": args.rows, "dim": args.dim, "pairs": pairs,
        "numpy_seconds": round(numpy_seconds, 3),
        "numpy_pairs_per_second": round(pairs / numpy_seconds),
        "clipguard_seconds": round(clipguard_seconds, 3),
        "clipguard_pairs_per_second": round(pairs / clipguard_seconds),
        "clipguard_stage_seconds": {k: round(v, 3) for k, v in stages.items()},
    }
    print(f"{'':12}{'seconds':>10}{'pairs/s':>14}")
    print(f"{'numpy loop':12}{numpy_seconds:10.2f}{pairs / numpy_seconds:14,.0f}")
    print(f"{'clipguard':12}{clipguard_seconds:10.2f}{pairs / clipguard_seconds:14,.0f}")
    print("clipguard stages:", result["clipguard_stage_seconds"], "| cpu:", result["cpu"], result["cores"], "cores")
    Path("bench-out").mkdir(exist_ok=True)
    Path("bench-out/from_embeddings_benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
