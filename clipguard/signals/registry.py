"""Every signal clipguard computes, and one way to read any of them back for a set of pairs."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipguard.signals.base import Scope, Signal, SignalError, SignalValues

# The folder inside an audit output that holds the cross-pair columns, one file per shard.
AUDIT_SIGNALS_DIR = "signals"

SIGNALS: tuple[Signal, ...] = (
    Signal("cosine_distance", Scope.pair,
           "1 - cosine similarity of the pair's image and caption under the reference", ("cosine_distance",)),
    Signal("image_fan_in", Scope.cross_pair,
           "distinct normalised captions behind this pair's exact image (same sha256)", ("image_fan_in",)),
    Signal("image_fan_in_near", Scope.cross_pair,
           "distinct normalised captions behind this pair's image and its near-duplicates (image-embedding neighbours)",
           ("image_fan_in_near", "image_group")),
    Signal("caption_fan_out", Scope.cross_pair,
           "distinct images (sha256) behind this pair's normalised caption", ("caption_fan_out",)),
    Signal("caption_fan_out_near", Scope.cross_pair,
           "distinct images behind this pair's caption and its near-identical captions (text-embedding neighbours)",
           ("caption_fan_out_near", "caption_group")),
    Signal("class_cell", Scope.cross_pair,
           "-log10 of the Poisson tail p-value of the pair's (caption class, image class) cell against the "
           "background of natural mismatches, corrected for the cells tested; 0 when classes agree or are unknown",
           ("class_cell_neglog10p", "caption_class", "image_class")),
    Signal("relabelled_image", Scope.cross_pair,
           "-log10 corrected p-value of the (caption class A, class B of the image's other captions) cell when the "
           "pair's caption is the minority class among its image's captions; 0 otherwise", ("relabel_neglog10p",)),
    Signal("stamped_image", Scope.cross_pair,
           "-log10 corrected p-value of the patch group (one tile's pixels shared by many images: a stamped trigger) "
           "whose label the pair's caption names, when its images' classes do not explain that label; 0 otherwise",
           ("stamped_neglog10p",)),
    Signal("image_cluster", Scope.cross_pair,
           "distinct images in this pair's near-duplicate image group", ("image_cluster_size", "image_group")),
    Signal("image_knn_distance", Scope.cross_pair,
           "cosine distance to the k-th nearest other image (sparse neighbourhoods are higher)", ("image_knn_distance",)),
    Signal("image_lof", Scope.cross_pair,
           "the image's k-distance over the mean k-distance of its neighbours (local outlier ratio)", ("image_lof",)),
    Signal("text_knn_distance", Scope.cross_pair,
           "cosine distance to the k-th nearest other caption", ("text_knn_distance",)),
    Signal("text_lof", Scope.cross_pair,
           "the caption's k-distance over the mean k-distance of its neighbours", ("text_lof",)),
)
_BY_NAME = {s.name: s for s in SIGNALS}


def signal_names(scope: Scope | None = None) -> list[str]:
    return [s.name for s in SIGNALS if scope is None or s.scope is scope]


def get_signal(name: str) -> Signal:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise SignalError(f"unknown signal {name!r}; known: {', '.join(_BY_NAME)}") from None


def read_signal(signal: str | Signal, folder: str | Path,
                pairs: Iterable[tuple[str, str]] | None = None) -> SignalValues:
    """A signal's main column from ``folder`` (a score folder for per-pair signals, an audit
    folder for cross-pair ones), for every pair there or, with ``pairs`` ((shard, key) tuples),
    for those pairs in that order, NaN where a pair has no value."""
    signal = get_signal(signal) if isinstance(signal, str) else signal
    folder = Path(folder)
    where = folder if signal.scope is Scope.pair else folder / AUDIT_SIGNALS_DIR
    files = sorted(where.glob("*.parquet")) if where.is_dir() else []
    if not files:
        made_by = "clipguard score" if signal.scope is Scope.pair else "clipguard audit"
        raise SignalError(f"no {signal.name} values in {folder}: expected {where}/*.parquet from `{made_by}`")
    tables = []
    for path in files:
        names = pq.read_schema(path).names
        if signal.column not in names:
            raise SignalError(f"{path} has no column {signal.column!r} (signal {signal.name})")
        tables.append(pq.read_table(path, columns=["shard", "key", signal.column]))
    table = pa.concat_tables(tables)
    shard = np.asarray(table.column("shard").to_pylist(), dtype=object)
    key = np.asarray(table.column("key").to_pylist(), dtype=object)
    values = table.column(signal.column).to_numpy(zero_copy_only=False).astype(np.float64)
    if pairs is None:
        return SignalValues(signal, shard, key, values)
    position = {(s, k): i for i, (s, k) in enumerate(zip(shard, key))}
    wanted = list(pairs)
    rows = np.array([position.get((s, k), -1) for s, k in wanted], dtype=np.int64)
    picked = np.where(rows >= 0, values[np.maximum(rows, 0)] if len(values) else np.nan, np.nan)
    return SignalValues(signal, np.array([s for s, _ in wanted], dtype=object),
                        np.array([k for _, k in wanted], dtype=object), picked.astype(np.float64))
