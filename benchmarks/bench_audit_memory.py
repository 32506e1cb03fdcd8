"""Peak memory and time of `clipguard audit` against earlier commits of the audit, in one run.

One clip-retrieval folder of --pairs pairs (--parts files, --dim float16 dims) is written and
scored once (`score_from_embeddings`); then each version of the code audits it in its own
process, the current checkout (once per --codes: what its faiss index stores) and each --baseline commit (a `git worktree` of it, made under
--work), one after another on the same files, warm in the page cache. Each process reports its
peak resident set (``VmHWM``) and, sampled every 20 ms, its peak anonymous resident memory (what
it holds itself; memory-mapped vectors are file pages the kernel may drop), after importing the
audit and after `run_audit`, the wall
seconds of `run_audit`, and its findings, so the versions can be checked to agree.

The data is web-like in what costs memory, not in what the tests find: 10 keyword classes,
image and text vectors around a centroid per class, captions unique but for a few boilerplate
ones, 1% of the images a stock photo reused under another caption (same sha256 and vector).
Above 50,000 distinct vectors the audit's neighbours come from faiss.

With ``--executors local,ray:2`` the checkout also audits with ``--executor ray`` (its part pass
and neighbour search as tasks on a local Ray of that many workers, started inside the timed run);
the workers' memory is their own and not in the driver's figures.

Usage: python benchmarks/bench_audit_memory.py [--pairs 100000] [--parts 8] [--dim 512]
       [--codes sq8,pq] [--executors local,ray:2] [--baseline 526295e --baseline f9f07d9] [--no-recall]
Prints a table and writes bench-out/audit_memory_benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from machine import run_header  # benchmarks/machine.py: run as a script, this folder is on the path

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STOCK_SHARE = 0.01
NOISE = 1.0  # a vector's noise norm against its class centre's 1: cosine to the centre about 0.7
BOILERPLATE = ["click here to enlarge", "image may contain", "stock photo", "free shipping"]

# Runs in the version's own process, with that version first on sys.path.
CHILD = r"""
import hashlib, json, sys, time
from pathlib import Path

import threading

def status_mib(field):  # this process's own figures (ru_maxrss would count the parent's at fork)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024

def peak_mib():
    return status_mib("VmHWM")

# Memory-mapped vectors count in the resident set as file pages the kernel may drop at any time;
# the anonymous part is what the process itself holds, sampled for its peak.
anon_peak = [0.0]
def sample_anon():
    while True:
        anon_peak[0] = max(anon_peak[0], status_mib("RssAnon"))
        time.sleep(0.02)

from clipguard.audit.pipeline import AuditConfig, run_audit
import clipguard
assert clipguard.__file__.startswith(sys.argv[6]), (clipguard.__file__, sys.argv[6])
imported, imported_anon = peak_mib(), status_mib("RssAnon")
threading.Thread(target=sample_anon, daemon=True).start()
scores, embeddings, out, keywords, codes = sys.argv[1:6]
executor = sys.argv[7] if len(sys.argv) > 7 else ""
started = time.perf_counter()
extra = {"index_codes": codes} if codes else {}  # earlier versions have no choice of codes
if executor.startswith("ray:"):  # its workers' memory is their own, not in this process's figures
    from clipguard.executors.spec import ExecutorSpec
    extra["executor"] = ExecutorSpec(kind="ray", workers=int(executor.split(":")[1]))
result = run_audit(AuditConfig(scores=Path(scores), embeddings=Path(embeddings), out=Path(out),
                               keywords=json.loads(keywords), **extra))
seconds = time.perf_counter() - started

def column_digest(values):  # the per-pair signal column's bytes, so versions can be held equal
    import numpy as np
    values = np.asarray(values)
    data = "\x1f".join(map(str, values.tolist())).encode() if values.dtype == object else values.tobytes()
    return hashlib.sha256(data).hexdigest()[:16]

print(json.dumps({
    "seconds": seconds,
    "peak_rss_after_imports_mib": imported,
    "peak_rss_mib": peak_mib(),
    "anon_after_imports_mib": imported_anon, "peak_anon_mib": anon_peak[0],
    "pairs_audited": len(result.pairs), "exact_search": result.exact_search,
    "findings": [[f.kind, f.goal, int(f.observed)] for f in result.findings],
    "signal_digests": {name: column_digest(column) for name, column in sorted(result.signal_columns.items())},
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


def scored_folder(work: Path, pairs: int, parts: int, dim: int) -> tuple[Path, Path]:
    """The clip-retrieval folder (`write_folder`) and its score folder under ``work``, made once
    for these sizes and reused by later runs (and by `bench_audit_inputs.py`)."""
    from clipguard.scoring.from_embeddings import EmbeddingSource, score_from_embeddings

    made = f"{pairs}-{parts}-{dim}-noise{NOISE}-stock{STOCK_SHARE}"  # a folder is reused only as made
    data, scores = work / f"embeddings-{made}", work / f"scores-{made}"
    if not (scores / "manifest.json").is_file():
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(scores, ignore_errors=True)
        write_folder(data, pairs, parts, dim)
        score_from_embeddings(EmbeddingSource(data, "clip-retrieval"), scores)
    return data, scores


def tree_of(commit: str, work: Path) -> Path:
    """A worktree of ``commit`` under ``work`` (made once, reused by later runs)."""
    tree = work / "trees" / commit
    if not (tree / "clipguard").is_dir():
        shutil.rmtree(tree, ignore_errors=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(tree), commit],
                       check=True, capture_output=True)
    return tree


def child_json(tree: Path, code: str, args: list[str], what: str) -> dict:
    """Run ``code`` with ``args`` in a fresh Python that imports clipguard from ``tree`` (on the
    benchmark's 2 threads unless OMP_NUM_THREADS says otherwise) and return the JSON object its
    last line prints; its stderr, and an exit, where it fails."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=tree, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{what} at {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def audit_with(tree: Path, scores: Path, embeddings: Path, out: Path, codes: str = "", executor: str = "") -> dict:
    shutil.rmtree(out, ignore_errors=True)
    keywords = json.dumps({c: [c] for c in CLASSES})
    return child_json(tree, CHILD, [str(scores), str(embeddings), str(out), keywords, codes, str(tree / "clipguard"),
                                    *([executor] if executor else [])], "the audit")


def neighbour_recall(data: Path, codes: list[str], queries: int = 2_000, k: int = 10, seed: int = 0) -> dict:
    """Recall@k of each index codes' search (nprobe as the audit's) against exact search, for
    ``queries`` image vectors of the folder drawn at random, each one's own row left out."""
    from clipguard.audit.neighbours import NeighbourIndex

    parts = sorted((data / "img_emb").glob("img_emb_*.npy"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    vectors = _unit(np.concatenate([np.load(p).astype(np.float32) for p in parts]))
    rows = np.random.default_rng(seed).choice(len(vectors), queries, replace=False)
    sims = vectors[rows] @ vectors.T
    sims[np.arange(queries), rows] = -np.inf
    truth = np.argpartition(-sims, k, axis=1)[:, :k]
    out = {}
    for name in codes:
        started = time.perf_counter()
        index = NeighbourIndex(vectors, exact_limit=0, codes=name)
        built = time.perf_counter() - started
        found = index.search(vectors[rows], k + 1).index
        found = [[f for f in row if f != own][:k] for row, own in zip(found, rows)]
        out[name] = {"recall_at_10": round(float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)])), 3),
                     "build_seconds": round(built, 1)}
    return out




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--parts", type=int, default=8)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--baseline", action="append", default=[], help="a commit to compare (repeatable)")
    parser.add_argument("--codes", default="sq8,pq", help="the checkout's faiss index codes to run, comma-separated")
    parser.add_argument("--executors", default="local",
                        help="the checkout's executors, comma-separated: local, ray:N (a local Ray of N workers)")
    parser.add_argument("--no-recall", action="store_true", help="skip the recall@10 of each index codes")
    parser.add_argument("--work", type=Path, default=Path("bench-out/audit_memory"))
    parser.add_argument("--out", type=Path, default=Path("bench-out/audit_memory_benchmark.json"))
    args = parser.parse_args()
    work = args.work.resolve()
    data, scores = scored_folder(work, args.pairs, args.parts, args.dim)
    for path in data.rglob("*"):  # into the page cache, so no version pays the first read
        if path.is_file():
            path.read_bytes()
    bytes_on_disk = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())

    executors = args.executors.split(",")
    versions = [(f"checkout {codes}" + ("" if executor == "local" else f" {executor}"), REPO, codes, executor)
                for executor in executors for codes in args.codes.split(",")]
    versions += [(commit, tree_of(commit, work), "", "") for commit in args.baseline]
    runs = {}
    for name, tree, codes, executor in versions:
        runs[name] = audit_with(tree, scores, data, work / f"audit-{name.replace(' ', '-').replace(':', '')}", codes,
                                "" if executor == "local" else executor)
        r = runs[name]
        print(f"{name:>20}: peak {r['peak_rss_mib']:,.0f} MiB (imports {r['peak_rss_after_imports_mib']:,.0f}), "
              f"anonymous {r['peak_anon_mib']:,.0f} MiB (imports {r['anon_after_imports_mib']:,.0f}), "
              f"{r['seconds']:.1f} s, {len(r['findings'])} findings", flush=True)
    recall = {} if args.no_recall else neighbour_recall(data, ["flat", *args.codes.split(",")])
    result = {
        **run_header(REPO), "pairs": args.pairs, "parts": args.parts, "dim": args.dim,
        "embedding_bytes_on_disk": bytes_on_disk, "runs": runs, "image_neighbour_recall_at_10": recall,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.pairs:,} pairs, {args.dim} dims, {bytes_on_disk / 2**20:,.0f} MiB of embeddings | "
          f"cpu: {result['cpu']}, {result['cores']} cores")
    print(f"{'version':>20}{'peak MiB':>10}{'anonymous':>11}{'anon above imports':>20}{'bytes/pair':>12}{'seconds':>9}  findings")
    for name, r in runs.items():
        above = r["peak_anon_mib"] - r["anon_after_imports_mib"]
        print(f"{name:>20}{r['peak_rss_mib']:10,.0f}{r['peak_anon_mib']:11,.0f}{above:20,.0f}{above * 2**20 / args.pairs:12,.0f}"
              f"{r['seconds']:9.1f}  {r['findings']}")
    first, *others = runs
    for name in others:  # every per-pair signal column, byte for byte, against the first version's
        differ = sorted(c for c, d in runs[first]["signal_digests"].items() if runs[name]["signal_digests"].get(c) != d)
        print(f"{name}: signal columns {'equal to ' + first if not differ else 'differ from ' + first + ': ' + ', '.join(differ)}")
    print("image neighbours, recall@10 against exact (2,000 queries): "
          + ", ".join(f"{name} {r['recall_at_10']:.3f}" for name, r in recall.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
