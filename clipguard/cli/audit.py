"""`clipguard audit`: flags -> AuditConfig -> run_audit; a short summary of the findings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from clipguard.cli.choices import AUDIT_DEFAULTS, ExecutorKind, IndexCodes
from clipguard.cli.common import console, err_console, progress_reporter, user_errors
from clipguard.cli.score import RayAddressOpt

SHOWN_FINDINGS = 10
SHOWN_PAIRS = 3


def audit(
    scores: Annotated[Path, typer.Argument(help="A `clipguard score --save-embeddings` folder.")],
    out: Annotated[Path, typer.Option(help="Folder for signals/<shard>.parquet, findings.json and findings.md (and, while it runs, the faiss indexes in .search-index/: with --executor ray on a cluster, a folder every worker reaches).")],
    embeddings: Annotated[Optional[Path], typer.Option(help="A clip-retrieval folder (img_emb/, text_emb/, metadata/ with key and caption) instead of SCORES's own.")] = None,
    keywords: Annotated[Optional[Path], typer.Option(help="Keyword file (JSON class -> [keywords]; the synthetic world writes keywords.json). Without it no class-based test runs.")] = None,
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Significance level after correction for the tests of each kind: what is a finding.")] = AUDIT_DEFAULTS.alpha,
    k: Annotated[int, typer.Option(min=1, max=1000, help="Neighbours for density and for an image's data-driven class.")] = AUDIT_DEFAULTS.k,
    image_duplicate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Cosine similarity at which two images are near-duplicates (raised to a quarter of the median nearest-neighbour distance where the data packs images closer).")] = AUDIT_DEFAULTS.image_duplicate,
    text_duplicate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Cosine similarity at which two captions are near-identical (raised likewise).")] = AUDIT_DEFAULTS.text_duplicate,
    exact_limit: Annotated[int, typer.Option(min=1, help="Up to this many vectors neighbours are exact; above it through faiss (the audit extra).")] = AUDIT_DEFAULTS.exact_limit,
    index_codes: Annotated[IndexCodes, typer.Option(help="What the faiss index keeps per vector (candidates are re-scored exactly from the files): sq8, a byte a dimension; pq, 64 bytes at 512 dimensions (for 10^8 vectors; chooses candidates less well); flat, float32.")] = IndexCodes(AUDIT_DEFAULTS.index_codes),
    partition_rows: Annotated[int, typer.Option(min=1, help="Rows, about, in one partition of the counting pass (distinct captions and images, counts per group, class cells, patch signatures), each worked alone, as a task: a process holds one partition's sort, not the whole data's (~250 MB at the default, measured). Lower it where memory is short; the partitions are files under --out while it runs.")] = AUDIT_DEFAULTS.partition_rows,
    executor: Annotated[ExecutorKind, typer.Option(help="Where the per-part pass (caption and image hashes, keyword classes, pair similarity) and, above --exact-limit, the neighbour search run: local or ray (a task per embedding part, and per range of the vectors searched: four ranges per Ray CPU).")] = ExecutorKind.local,
    workers: Annotated[int, typer.Option(min=1, help="Ray: CPUs of the local Ray instance it starts (without --ray-address). Local runs the tasks in this process.")] = 1,
    ray_address: RayAddressOpt = None,
) -> None:
    """Find what a pair threshold misses: one image behind many captions, one caption behind many images, over-represented (caption class, image class) cells and clusters of near-identical images; findings ranked by corrected p-value.

    Exits 0 whether or not there are findings (they are results); 2 on bad input.

    \b
    Example:
      clipguard audit scores/ --keywords world/keywords.json --out audit/
    """
    # Imported here so that `--help` does not wait for numpy, scipy and pyarrow.
    from clipguard.audit import AuditConfig, run_audit
    from clipguard.executors.spec import ExecutorSpec

    with user_errors(), progress_reporter() as progress:
        task = progress.task("audit: per-part pass", steps="parts", unit="parts")
        searches = {}

        def on_search(side: str, searched: int, total: int) -> None:  # a line per side, from its first range
            if side not in searches:
                searches[side] = progress.task(f"audit: {side} neighbours", steps="vectors", unit="vectors")
            searches[side].update(completed=searched, total=total, done=searched)
            if searched == total:
                searches[side].finish()

        def on_part(done: int, total: int) -> None:
            task.update(completed=done, total=total, done=done)
            if done == total:
                task.finish()

        on = ExecutorSpec(kind=executor.value, address=ray_address, workers=workers)
        result = run_audit(AuditConfig(
            scores=scores, out=out, embeddings=embeddings, keywords=keywords, alpha=alpha, k=k,
            image_duplicate=image_duplicate, text_duplicate=text_duplicate, exact_limit=exact_limit,
            index_codes=index_codes.value, executor=on, partition_rows=partition_rows,
        ), on_part=on_part, on_search=on_search)
    pairs = result.pairs
    console.print(f"audited {len(pairs):,} of {pairs.scored:,} scored pairs "
                  f"({pairs.without_embeddings:,} without embeddings); neighbours "
                  f"{'exact' if result.exact_search else 'through faiss'}", markup=False, highlight=False)
    if not result.classes_known:
        err_console.print("no --keywords: no class-based test ran, so no goal can be found", markup=False, highlight=False)
    console.print(f"{len(result.findings)} finding(s) at significance {alpha:g}", markup=False, highlight=False)
    for rank, finding in enumerate(result.findings[:SHOWN_FINDINGS], 1):
        console.print(f"{rank}. [{finding.kind} {finding.goal}] {finding.description}", markup=False, highlight=False)
        shown = finding.rows[:SHOWN_PAIRS]
        for row, caption in zip(shown, pairs.captions(shown)):
            console.print(f"     {pairs.shard[row]}/{pairs.key[row]}: {caption[:80]}", markup=False, highlight=False)
    if len(result.findings) > SHOWN_FINDINGS:
        console.print(f"... {len(result.findings) - SHOWN_FINDINGS} more", markup=False, highlight=False)
    console.print(f"findings: {out / 'findings.md'} (and findings.json); signals: {out / 'signals'}", markup=False, highlight=False)
