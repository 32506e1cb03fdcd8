"""Peak memory and time of `clipguard audit` against earlier commits of the audit, in one run.

One clip-retrieval folder of --pairs pairs (--parts files, --dim float16 dims) is written and
scored once (`score_from_embeddings`); then each version of the code audits it in its own
process, the current checkout (once per --codes: what its faiss index stores) and each --baseline commit (a `git worktree` of it, made under
--work), one after another on the same files, warm in the page cache. Each process reports its
peak resident set (``VmHWM``) after importing the audit and after `run_audit`, the wall
seconds of `run_audit`, and its findings, so the versions can be checked to agree.

The data is web-like in what costs memory, not in what the tests find: 10 keyword classes,
image and text vectors around a centroid per class, captions unique but for a few boilerplate
ones, 1% of the images a stock photo reused under another caption (same sha256 and vector).
Above 50,000 distinct vectors the audit's neighbours come from faiss.

Usage: python benchmarks/bench_audit_memory.py [--pairs 100000] [--parts 8] [--dim 512]
       [--codes sq8,pq] [--baseline 526295e --baseline f9f07d9]
Prints a table and writes bench-out/audit_memory_benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STOCK_SHARE = 0.01
NOISE = 1.0  # a vector's noise norm against its class centre's 1: cosine to the centre about 0.7
BOILERPLATE = ["click here to enlarge", "image may contain", "stock photo", "free shipping"]

# Runs in the version's own process, with that version first on sys.path.
CHILD = r"""
import json, sys, time
from pathlib import Path

def peak_mib():  # this process's own high-water mark (ru_maxrss would count the parent's at fork)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024

from clipguard.audit.pipeline import AuditConfig, run_audit
imported = peak_mib()
scores, embeddings, out, keywords, codes = sys.argv[1:6]
started = time.perf_counter()
extra = {"index_codes": codes} if codes else {}  # earlier versions have no choice of codes
result = run_audit(AuditConfig(scores=Path(scores), embeddings=Path(embeddings), out=Path(out),
                               keywords=json.loads(keywords), **extra))
seconds = time.perf_counter() - started
print(json.dumps({
    "seconds": seconds,
    "peak_rss_after_imports_mib": imported,
    "peak_rss_mib": peak_mib(),
    "pairs_audited": len(result.pairs), "exact_search": result.exact_search,
    "findings": [[f.kind, f.goal, int(f.observed)] for f in result.findings],
    "stage_seconds": {k: round(v, 2) for k, v in result.seconds.items()},
}))
"""


def write_folder(root: Path, pairs: int, parts: int, dim: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    image_centres = _unit(rng.standard_normal((len(CLASSES), dim), dtype=np.float32))
    text_centres = _unit(rng.standard_normal((len(CLASSES), dim), dtype=np.float32))
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    per_part = -(-pairs // parts)
    stock: list[tuple[np.ndarray, str]] = []  # (vector, sha256) of images reused later
    for p in range(parts):
        rows = min(per_part, pairs - p * per_part)
        cls = rng.integers(0, len(CLASSES), rows)
        image = _unit(image_centres[cls] + NOISE / np.sqrt(dim) * rng.standard_normal((rows, dim), dtype=np.float32))
        text = _unit(text_centres[cls] + NOISE / np.sqrt(dim) * rng.standard_normal((rows, dim), dtype=np.float32))
        sha = [f"{p:04d}{j:012d}" for j in range(rows)]
        for j in np.flatnonzero(rng.random(rows) < STOCK_SHARE):
            if stock:  # a stock photo seen before, under this row's caption
                vector, digest = stock[int(rng.integers(len(stock)))]
                image[j], sha[j] = vector, digest
            stock.append((image[j].copy(), sha[j]))
        captions = [f"a photo of a {CLASSES[c]} number {p}-{j}" for j, c in enumerate(cls)]
        for j in np.flatnonzero(rng.random(rows) < 0.02):
            captions[j] = BOILERPLATE[int(rng.integers(len(BOILERPLATE)))]
        np.save(root / "img_emb" / f"img_emb_{p}.npy", image.astype(np.float16))
        np.save(root / "text_emb" / f"text_emb_{p}.npy", text.astype(np.float16))
        pq.write_table(pa.table({"key": [f"{p:04d}{j:08d}" for j in range(rows)], "caption": captions,
                                 "image_sha256": sha}), root / "metadata" / f"metadata_{p}.parquet")


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def tree_of(commit: str, work: Path) -> Path:
    """A worktree of ``commit`` under ``work`` (made once, reused by later runs)."""
    tree = work / "trees" / commit
    if not (tree / "clipguard").is_dir():
        shutil.rmtree(tree, ignore_errors=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(tree), commit],
                       check=True, capture_output=True)
    return tree


def audit_with(tree: Path, scores: Path, embeddings: Path, out: Path, codes: str = "") -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    keywords = json.dumps({c: [c] for c in CLASSES})
    done = subprocess.run([sys.executable, "-c", CHILD, str(scores), str(embeddings), str(out), keywords, codes],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the audit at {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--parts", type=int, default=8)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--baseline", action="append", default=[], help="a commit to compare (repeatable)")
    parser.add_argument("--codes", default="sq8,pq", help="the checkout's faiss index codes to run, comma-separated")
    parser.add_argument("--work", type=Path, default=Path("bench-out/audit_memory"))
    parser.add_argument("--out", type=Path, default=Path("bench-out/audit_memory_benchmark.json"))
    args = parser.parse_args()
    from clipguard.scoring.from_embeddings import EmbeddingSource, score_from_embeddings

    work = args.work.resolve()
    data, scores = work / f"embeddings-{args.pairs}-{args.dim}", work / f"scores-{args.pairs}-{args.dim}"
    if not (scores / "manifest.json").is_file():
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(scores, ignore_errors=True)
        write_folder(data, args.pairs, args.parts, args.dim)
        score_from_embeddings(EmbeddingSource(data, "clip-retrieval"), scores)
    for path in data.rglob("*"):  # into the page cache, so no version pays the first read
        if path.is_file():
            path.read_bytes()
    bytes_on_disk = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())

    versions = [(f"checkout {codes}", REPO, codes) for codes in args.codes.split(",")]
    versions += [(commit, tree_of(commit, work), "") for commit in args.baseline]
    runs = {}
    for name, tree, codes in versions:
        runs[name] = audit_with(tree, scores, data, work / f"audit-{name.replace(' ', '-')}", codes)
        r = runs[name]
        print(f"{name:>14}: peak {r['peak_rss_mib']:,.0f} MiB (imports {r['peak_rss_after_imports_mib']:,.0f}), "
              f"{r['seconds']:.1f} s, {len(r['findings'])} findings", flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)),
        "pairs": args.pairs, "parts": args.parts, "dim": args.dim, "embedding_bytes_on_disk": bytes_on_disk,
        "head": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                               text=True).stdout.strip(),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.pairs:,} pairs, {args.dim} dims, {bytes_on_disk / 2**20:,.0f} MiB of embeddings | "
          f"cpu: {result['cpu']}, {result['cores']} cores")
    print(f"{'version':>14}{'peak MiB':>10}{'above imports':>15}{'bytes/pair':>12}{'seconds':>9}  findings")
    for name, r in runs.items():
        above = r["peak_rss_mib"] - r["peak_rss_after_imports_mib"]
        print(f"{name:>14}{r['peak_rss_mib']:10,.0f}{above:15,.0f}{above * 2**20 / args.pairs:12,.0f}{r['seconds']:9.1f}"
              f"  {r['findings']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
