"""Per-pair columns on disk: appended a part at a time, then read memory-mapped.

At 10^8 pairs the audit's per-pair columns (shard number, two hashes, a class, a similarity,
where each row lies, 8 patch signatures: ~108 bytes a pair) are ~11 GB. Held as numpy arrays they are anonymous
memory, which the driver must have; as memory-mapped files they are page cache, which the OS
fills from disk as rows are read and drops under pressure (the data's passes read them in
order, a chunk at a time). `ColumnFiles` writes each column as the raw bytes of one file, a
part's rows appended after the last, and opens them read-only with `np.memmap`; `StringFile`
does the same for the keys, as an Arrow IPC file; `PairArrays` gives a stage a per-pair output
of its own in the same folder (written, then read).

The files live in the audit's working folder (``OUT/.search-index``), removed with it at the
end; an array still mapped then stays readable (on POSIX an unlinked file lives while mapped).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa


class ColumnFiles:
    """Named per-pair columns of fixed dtypes appended a block of rows at a time, to a file each in
    ``folder`` (in memory where ``folder`` is None); `open` gives each whole column, mapped from its
    file. A matrix column (2-D blocks, or None for a block without it) whose blocks differ in
    width is padded with 0 to the widest."""

    def __init__(self, folder: Path | None, columns: dict[str, np.dtype]):
        self.folder = None if folder is None else Path(folder)
        self.dtypes = {name: np.dtype(dtype) for name, dtype in columns.items()}
        self.rows = 0
        self._widths: dict[str, list[tuple[int, int]]] = {}  # matrix column -> (rows, width) per block
        self._blocks: dict[str, list[np.ndarray]] = {name: [] for name in self.dtypes}  # without a folder
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            for name in self.dtypes:  # appended to from empty: what an earlier, killed run left goes
                self._path(name).unlink(missing_ok=True)

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.bin"

    def add(self, **columns: np.ndarray | None) -> None:
        """One block: every column, the same number of rows (a matrix column may be None: a
        block without it, all 0)."""
        lengths = {len(c) for c in columns.values() if c is not None}
        if len(lengths) > 1 or set(columns) != set(self.dtypes):
            raise ValueError(f"a block needs every column ({sorted(self.dtypes)}) with one number of rows, got {lengths}")
        rows = lengths.pop() if lengths else 0
        for name, column in columns.items():
            if column is None or np.ndim(column) == 2:
                self._widths.setdefault(name, []).append((rows, 0 if column is None else column.shape[1]))
                if column is None:
                    continue
            column = np.ascontiguousarray(column, self.dtypes[name])
            if self.folder is None:
                self._blocks[name].append(column)
            else:
                with open(self._path(name), "ab") as f:
                    column.tofile(f)
        self.rows += rows

    def open(self) -> dict[str, np.ndarray]:
        """Every column whole: memory-mapped read-only from its file (or joined in memory)."""
        return {name: self._open(name) for name in self.dtypes}

    def _open(self, name: str) -> np.ndarray:
        dtype, blocks = self.dtypes[name], self._widths.get(name)
        if blocks is None:  # one value a row
            if self.folder is None:
                return np.concatenate(self._blocks[name]) if self._blocks[name] else np.zeros(0, dtype)
            return _mapped(self._path(name), dtype, (self.rows,))
        shape = (self.rows, max((w for _, w in blocks), default=0))
        if self.folder is not None and all(w == shape[1] for _, w in blocks):
            return _mapped(self._path(name), dtype, shape)
        return self._padded(name, blocks, shape)

    def _padded(self, name: str, blocks: list[tuple[int, int]], shape: tuple[int, int]) -> np.ndarray:
        """A matrix column with its blocks padded with 0 to the widest, a block at a time: in
        memory, or into a mapped file beside its raw one (which then goes)."""
        dtype = self.dtypes[name]
        padded = None if self.folder is None else self.folder / f"{name}.padded.npy"
        out = np.zeros(shape, dtype) if padded is None else np.lib.format.open_memmap(padded, mode="w+", dtype=dtype,
                                                                                      shape=shape)
        given, start = self._matrix_blocks(name, blocks), 0
        for rows, width in blocks:
            if width:
                out[start:start + rows, :width] = next(given)
            start += rows
        if padded is None:
            return out
        out.flush()
        del out
        self._path(name).unlink(missing_ok=True)
        return np.asarray(np.load(padded, mmap_mode="r"))

    def _matrix_blocks(self, name: str, blocks: list[tuple[int, int]]):
        """The matrix column's blocks that have it, in order, from memory or from its raw file."""
        if self.folder is None:
            yield from self._blocks[name]
            return
        dtype = self.dtypes[name]
        with open(self._path(name), "rb") as raw:
            for rows, width in blocks:
                if width:
                    yield np.fromfile(raw, dtype, rows * width).reshape(rows, width)


class StringFile:
    """Strings (a pair's key) appended a block at a time to an Arrow IPC file in ``folder`` (in
    memory where ``folder`` is None), read back as one chunked array over the memory-mapped file:
    arrow reads IPC without copying, so 10^8 keys are file pages, not ~3 GB of the driver's."""

    def __init__(self, folder: Path | None, name: str):
        self.path = None if folder is None else Path(folder) / f"{name}.arrow"
        self._blocks: list[pa.Array] = []
        self._writer = None

    def add(self, values: pa.Array) -> None:
        values = values.cast(pa.large_string())
        if self.path is None:
            self._blocks.append(values)
            return
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pa.ipc.new_file(str(self.path), pa.schema([("value", pa.large_string())]))
        self._writer.write_batch(pa.record_batch([values], names=["value"]))

    def open(self) -> pa.Array | pa.ChunkedArray:
        if self.path is None or self._writer is None:
            return pa.concat_arrays(self._blocks) if self._blocks else pa.array([], pa.large_string())
        self._writer.close()
        return pa.ipc.open_file(pa.memory_map(str(self.path))).read_all().column("value")


class PairArrays:
    """Per-pair outputs of the audit's stages as memory-mapped files in ``folder`` (in memory
    where ``folder`` is None): `new` for an array to fill, then read."""

    def __init__(self, folder: Path | None):
        self.folder = None if folder is None else Path(folder)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def new(self, name: str, rows: int, dtype) -> np.ndarray:
        if self.folder is None or not rows:
            return np.empty(rows, dtype)
        return np.asarray(np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+", dtype=np.dtype(dtype),
                                                    shape=(rows,)))

    def gather(self, name: str, table: np.ndarray, index: np.ndarray, block: int = 1 << 20) -> np.ndarray:
        """``table[index]`` (a per-group table read at each pair's group) into a new array, a
        block of pairs at a time."""
        out = self.new(name, len(index), np.asarray(table).dtype)
        for start in range(0, len(index), block):
            out[start:start + block] = table[index[start:start + block]]
        return out


def _mapped(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if not int(np.prod(shape)):  # nothing written (mmap cannot map an empty file)
        return np.zeros(shape, dtype)
    return np.asarray(np.memmap(path, dtype=dtype, mode="r", shape=shape))  # a plain ndarray over the map
