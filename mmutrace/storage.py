"""Trace files on disk: write them crash-safely, read them row group by row group, repair them.

A trace is one Parquet file (schema.ARROW_SCHEMA) ordered by ``(ts_ns, cpu, seq)``.  The recorder's
per-CPU buffers deliver events out of order, and a recorder can die at any moment, so writing goes
through three stages:

1. ``TraceWriter.write_batch`` holds rows back for ``reorder_window_ns`` and releases the sorted rows
   older than the newest timestamp minus the window.
2. Released rows become *segments*: complete small Parquet files (one row group each, carrying the
   metadata so far) in the hidden sibling directory ``.NAME.parquet.partial/``.  A SIGKILL loses
   only what was not yet released: the rows inside the window, never more than two row groups.
3. ``close`` merges the segments, each sorted, into the final file with an exact k-way merge that
   keeps only overlapping segments in memory, writes it under a temporary name, renames it into place
   and removes the segments.  Rows that arrive later than the window are therefore still placed
   correctly; they are counted in the metadata (``reorder.late_rows``), never dropped.

``repair`` runs stage 3 on the segments a killed writer left behind; the result says
``complete: false`` unless the writer had flushed everything before it died.  docs/schema.md
describes the format, the crash-safety design, the encodings and their measured cost.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmutrace import schema
from mmutrace.errors import TraceFileError, UsageError

__all__ = [
    "EVENT_NAMES",
    "TraceReader",
    "TraceWriter",
    "check_output",
    "open_trace",
    "partial_dir",
    "repair",
    "to_table",
]

#: The dictionary of the ``event`` column: the catalogue, so every batch shares one dictionary.
EVENT_NAMES = pa.array([e.name for e in schema.EVENTS], pa.string())
_EVENT_TYPE = schema.COLUMN_TYPES["event"]
_SORT_KEYS = [(name, "ascending") for name in schema.SORT_COLUMNS]
_REQUIRED = tuple(f.name for f in schema.ARROW_SCHEMA if not f.nullable)

_SEGMENT_GLOB = "seg-*.parquet"
_CLOSING_NAME = "closing.json"  # the final metadata, written once every event is in a segment
_SEGMENT_KEY = b"mmutrace.segment"  # JSON {first, last, rows, row_group_rows} of one sorted segment

#: Column statistics are kept where a reader can use them to skip row groups (time and CPU ranges,
#: the span in ``info``); elsewhere they only cost space.
_STATISTICS_COLUMNS = ["ts_ns", "cpu", "seq", "vm", "vcpu", "gfn"]
#: Column encodings, measured on a real recording (docs/schema.md "Encodings and size").  ts_ns and
#: seq are monotonic per CPU and gfn moves in small steps: delta packs them into a few bits.  The
#: other 64-bit columns (SPTEs, addresses, pointers) mix unrelated values from interleaved events,
#: where deltas are large; byte-stream split groups their mostly constant high bytes for zstd.
_DELTA_COLUMNS = ("ts_ns", "seq", "gfn")
_BYTE_STREAM_SPLIT_COLUMNS = tuple(
    f.name for f in schema.ARROW_SCHEMA
    if pa.types.is_integer(f.type) and f.type.bit_width == 64 and f.name not in _DELTA_COLUMNS
)
#: Row groups' worth of rows the reorder window may hold before the oldest are released anyway:
#: bounds the writer's memory and what a SIGKILL can lose (held rows are not on disk yet).
_MAX_HELD_GROUPS = 2
_ZSTD_LEVEL = 3  # levels 6-12 gain <1% on trace data and cost up to 5x the time


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _stop_signals_deferred() -> Iterator[None]:
    """Run the block, then deliver the SIGINT/SIGTERM that arrived during it.

    The recorder stops by raising KeyboardInterrupt from its signal handlers; raised between
    writing a segment and recording it (or between slicing the pending rows and keeping the rest),
    it would drop or duplicate rows.  Python runs handlers in the main thread only, so elsewhere
    there is nothing to defer.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in _STOP_SIGNALS}
    if any(handler is None for handler in previous.values()):  # installed outside Python: leave it
        yield
        return
    for signum in _STOP_SIGNALS:
        signal.signal(signum, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in caught:
            signal.raise_signal(signum)


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


def partial_dir(path: str | os.PathLike[str]) -> Path:
    """The hidden directory holding the flushed segments of ``path`` while it is being written."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def _final_path_of(partial: Path) -> Path:
    """Inverse of ``partial_dir``."""
    name = partial.name
    if not (name.startswith(".") and name.endswith(".partial")):
        raise UsageError(f"{partial} is not a trace's segment directory (.NAME.parquet.partial)")
    return partial.with_name(name[1 : -len(".partial")])


def check_output(path: str | os.PathLike[str], force: bool) -> Path:
    """Refuse an output the writer could not or should not create; called before recording starts.

    Raises UsageError when ``path`` exists (or an unfinished recording of it does) and ``force`` is
    false, or when its directory is missing or not writable.
    """
    path = Path(path)
    try:
        _check_output(path, force)
    except OSError as exc:  # e.g. a parent directory that cannot be searched
        raise UsageError(f"output {path}: {exc.strerror}") from None
    return path


def _check_output(path: Path, force: bool) -> None:
    if path.is_dir():
        raise UsageError(f"output {path} is a directory")
    directory = path.parent
    if not directory.exists():
        raise UsageError(f"output directory {directory} does not exist")
    if not directory.is_dir():
        raise UsageError(f"output directory {directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {directory} is not writable")
    if not force:
        if path.exists():
            raise UsageError(f"output {path} exists (use --force to overwrite)")
        if partial_dir(path).exists():
            raise UsageError(
                f"an unfinished recording of {path} exists in {partial_dir(path)} "
                f"(run 'mmutrace repair {path}' or use --force to discard it)"
            )


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def _event_column(values: Any) -> pa.Array:
    """Event names (strings or a dictionary array) re-encoded against the catalogue dictionary."""
    if not isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = pa.array(values, pa.string())
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_dictionary(values.type):
        if values.dictionary.equals(EVENT_NAMES):  # the recorder's own encoding: nothing to do
            return values.cast(_EVENT_TYPE)
        values = values.cast(pa.string())
    codes = pc.index_in(values, value_set=EVENT_NAMES)
    if codes.null_count > values.null_count:
        unknown = pc.unique(pc.filter(values, pc.and_(pc.is_null(codes), pc.is_valid(values)))).to_pylist()
        raise ValueError(f"events not in schema.EVENTS: {', '.join(sorted(unknown))}")
    return pa.DictionaryArray.from_arrays(codes.cast(pa.int16()), EVENT_NAMES)


def to_table(batch: pa.RecordBatch | pa.Table | Mapping[str, Any]) -> pa.Table:
    """``batch`` as a table of exactly schema.ARROW_SCHEMA: columns cast, missing ones null.

    ``batch`` is an Arrow batch/table or a mapping of column name to numpy array, Arrow array or
    list.  Unknown columns, missing non-nullable columns and unknown event names are programming
    errors of the producer (ValueError).
    """
    if isinstance(batch, (pa.RecordBatch, pa.Table)):
        columns = {name: batch.column(name) for name in batch.schema.names}
    else:
        columns = dict(batch)
    unknown = set(columns) - set(schema.COLUMN_TYPES)
    if unknown:
        raise ValueError(f"columns not in schema.ARROW_SCHEMA: {', '.join(sorted(unknown))}")
    missing = [name for name in _REQUIRED if name not in columns]
    if missing:
        raise ValueError(f"batch lacks required columns: {', '.join(missing)}")
    rows = len(columns["ts_ns"])
    arrays = []
    for field in schema.ARROW_SCHEMA:
        values = columns.get(field.name)
        if values is None:
            arrays.append(pa.nulls(rows, field.type))
        elif field.name == "event":
            arrays.append(_event_column(values))
        elif isinstance(values, (pa.Array, pa.ChunkedArray)):
            arrays.append(values if values.type == field.type else values.cast(field.type))
        else:
            arrays.append(pa.array(values, field.type))
        if len(arrays[-1]) != rows:
            raise ValueError(f"column {field.name} has {len(arrays[-1])} rows, ts_ns has {rows}")
        if not field.nullable and arrays[-1].null_count:
            raise ValueError(f"column {field.name} has nulls")
    return pa.Table.from_arrays(arrays, schema=schema.ARROW_SCHEMA)


# --------------------------------------------------------------------------------------------
# Sort keys
# --------------------------------------------------------------------------------------------

Key = tuple[int, int, int]


def _key_at(table: pa.Table, row: int) -> Key:
    return tuple(table.column(name)[row].as_py() for name in schema.SORT_COLUMNS)  # type: ignore[return-value]


def _sorted(table: pa.Table) -> pa.Table:
    """``table`` in key order; a check first, because recorder batches are mostly in order already."""
    ts, cpu, seq = (table.column(name).to_numpy() for name in schema.SORT_COLUMNS)
    later = ts[1:] > ts[:-1]
    if later.all():
        return table
    tie = ts[1:] == ts[:-1]
    same_cpu = cpu[1:] == cpu[:-1]
    if (later | (tie & ((cpu[1:] > cpu[:-1]) | (same_cpu & (seq[1:] >= seq[:-1]))))).all():
        return table
    return table.combine_chunks().sort_by(_SORT_KEYS)


def _rows_up_to(table: pa.Table, bound: Key) -> int:
    """How many leading rows of the sorted ``table`` have a key <= ``bound``."""
    ts, cpu, seq = (table.column(name).to_numpy() for name in schema.SORT_COLUMNS)
    t, c, s = bound
    le = (ts < t) | ((ts == t) & ((cpu < c) | ((cpu == c) & (seq <= s))))
    return int(np.count_nonzero(le))


# --------------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------------


def _parquet_writer(path: Path, metadata: dict[bytes, bytes]) -> pq.ParquetWriter:
    """A writer with the trace encodings (docs/schema.md "Encodings" has the measurements)."""
    sort_index = [schema.ARROW_SCHEMA.get_field_index(name) for name in schema.SORT_COLUMNS]
    return pq.ParquetWriter(
        path,
        schema.ARROW_SCHEMA.with_metadata(metadata),
        compression="zstd",
        compression_level=_ZSTD_LEVEL,
        use_dictionary=["event"],
        column_encoding={
            **{name: "DELTA_BINARY_PACKED" for name in _DELTA_COLUMNS},
            **{name: "BYTE_STREAM_SPLIT" for name in _BYTE_STREAM_SPLIT_COLUMNS},
        },
        write_statistics=_STATISTICS_COLUMNS,
        sorting_columns=[pq.SortingColumn(i) for i in sort_index],
    )


def _json_value(value: object) -> object:
    """numpy scalars and paths, which producers naturally hand over, as their JSON equivalents."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"metadata value {value!r} ({type(value).__name__}) is not JSON")


def _metadata_bytes(metadata: Mapping[str, Any]) -> bytes:
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"), default=_json_value).encode()


@dataclass(frozen=True)
class _Segment:
    """One flushed, sorted segment file and its key range."""

    path: Path
    first: Key
    last: Key
    rows: int
    row_group_rows: int  # the writer's setting, so a repaired file keeps its row-group size

    @classmethod
    def load(cls, path: Path) -> _Segment:
        kv = pq.read_metadata(path).metadata or {}
        info = json.loads(kv[_SEGMENT_KEY])
        return cls(path, tuple(info["first"]), tuple(info["last"]), info["rows"], info["row_group_rows"])  # type: ignore[arg-type]

    def info(self) -> bytes:
        return json.dumps(
            {"first": self.first, "last": self.last, "rows": self.rows, "row_group_rows": self.row_group_rows}
        ).encode()


class _Cursor:
    """Reads one segment row group by row group; ``table`` is the loaded, not yet emitted rows."""

    def __init__(self, segment: _Segment) -> None:
        self._file = pq.ParquetFile(segment.path)
        self._next_group = 0
        self.table = self._load()

    def _load(self) -> pa.Table | None:
        while self._next_group < self._file.num_row_groups:
            table = self._file.read_row_group(self._next_group)
            self._next_group += 1
            if table.num_rows:
                return table
        self._file.close()
        return None

    def last_key(self) -> Key:
        assert self.table is not None
        return _key_at(self.table, self.table.num_rows - 1)

    def take_up_to(self, bound: Key) -> pa.Table:
        """Remove and return the loaded rows with key <= ``bound``, loading the next group if drained."""
        assert self.table is not None
        n = _rows_up_to(self.table, bound)
        head, self.table = self.table.slice(0, n), self.table.slice(n)
        if not self.table.num_rows:
            self.table = self._load()
        return head


def _merge_segments(segments: list[_Segment]) -> Iterator[pa.Table]:
    """Yield the rows of the sorted ``segments`` in key order.

    A block k-way merge: ``bound`` is the smallest last key among the loaded row groups, so every row
    <= bound is loaded and can be emitted.  Segments open only when their first key reaches the
    bound, so disjoint segments (the normal case) stream one row group at a time and only
    overlapping ones (late rows) are held together.
    """
    todo = sorted(segments, key=lambda s: s.first)
    todo.reverse()  # pop() from the end
    cursors: list[_Cursor] = []
    while todo or cursors:
        if not cursors:
            cursor = _Cursor(todo.pop())
            if cursor.table is None:
                continue
            cursors.append(cursor)
        bound = min(c.last_key() for c in cursors)
        while todo and todo[-1].first <= bound:
            cursor = _Cursor(todo.pop())
            if cursor.table is not None:
                cursors.append(cursor)
                bound = min(bound, cursor.last_key())
        heads = [h for h in (c.take_up_to(bound) for c in cursors) if h.num_rows]
        cursors = [c for c in cursors if c.table is not None]
        if len(heads) == 1:
            yield heads[0]
        elif heads:
            yield pa.concat_tables(heads).sort_by(_SORT_KEYS)


def _unfinished_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata a recording's segments carry until it is finalized."""
    return {**json.loads(_metadata_bytes(metadata)), "schema_version": schema.SCHEMA_VERSION, "complete": False}


def _write_segment_file(segment: _Segment, table: pa.Table, metadata: Mapping[str, Any]) -> None:
    """One sorted row group as a complete Parquet file, renamed into place once whole."""
    tmp = segment.path.with_suffix(".tmp")
    kv = {schema.METADATA_KEY: _metadata_bytes(metadata), _SEGMENT_KEY: segment.info()}
    with _parquet_writer(tmp, kv) as writer:
        writer.write_table(table, row_group_size=table.num_rows)
    os.replace(tmp, segment.path)


def append_segment(partial: Path, table: pa.Table | Mapping[str, Any], metadata: Mapping[str, Any], row_group_rows: int) -> None:
    """Add ``table`` (rows in any order) to an unfinished recording as one more sorted segment.

    For rows that reached disk outside a TraceWriter (the bcc recorder's raw spool): once they are
    segments, ``repair`` merges them with the rest in key order like any late rows.
    """
    table = to_table(table)
    if not table.num_rows:
        return
    table = _sorted(table)
    index = max((int(p.stem.split("-")[1]) + 1 for p in partial.glob(_SEGMENT_GLOB)), default=0)
    segment = _Segment(partial / f"seg-{index:06d}.parquet", _key_at(table, 0), _key_at(table, table.num_rows - 1),
                       table.num_rows, row_group_rows)
    _write_segment_file(segment, table, _unfinished_metadata(metadata))


def _write_merged(segments: list[_Segment], path: Path, metadata: Mapping[str, Any], row_group_rows: int) -> None:
    """Merge ``segments`` into ``path`` in row groups of ``row_group_rows``.

    Written under a temporary name in the partial directory and renamed, so the file appears under
    ``path`` only when it is whole.
    """
    tmp = partial_dir(path) / "final.parquet.tmp"
    pending: list[pa.Table] = []
    pending_rows = 0
    with _parquet_writer(tmp, {schema.METADATA_KEY: _metadata_bytes(metadata)}) as writer:
        for table in _merge_segments(segments):
            pending.append(table)
            pending_rows += table.num_rows
            while pending_rows >= row_group_rows:
                merged = pa.concat_tables(pending)
                writer.write_table(merged.slice(0, row_group_rows), row_group_size=row_group_rows)
                rest = merged.slice(row_group_rows)
                pending, pending_rows = [rest], rest.num_rows
        if pending_rows:
            writer.write_table(pa.concat_tables(pending), row_group_size=row_group_rows)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class TraceWriter:
    """Write one trace file; a context manager that finalizes the file however the block ends.

    Ending the block normally, or by KeyboardInterrupt/SystemExit (how the recorder's signal
    handlers stop it), writes ``complete: true``: every event handed to the writer is in the file,
    and ``stop_reason`` says what stopped it.  Any other exception still finalizes a valid file but
    with ``complete: false``, since the producer may have lost events on the way.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        metadata: Mapping[str, Any],
        *,
        force: bool = False,
        row_group_rows: int = 262144,
        reorder_window_ns: int = 200_000_000,
        flush_interval_s: float = 1.0,
    ) -> None:
        self._metadata = _unfinished_metadata(metadata)
        self.path = check_output(path, force)
        self._partial = partial_dir(self.path)
        if force:
            shutil.rmtree(self._partial, ignore_errors=True)
        self._partial.mkdir()
        self._row_group_rows = row_group_rows
        self._window_ns = reorder_window_ns
        self._flush_interval_s = flush_interval_s
        self._pending: list[pa.Table] = []
        self._pending_ts: list[np.ndarray] = []  # each pending table's ts_ns, sorted
        self._pending_rows = 0
        self._newest_ts = 0
        self._flushed_last: Key | None = None
        self._late_rows = 0
        self._segments: list[_Segment] = []
        self._last_flush = time.monotonic()
        self._closed = False
        self.events_written = 0
        self.bytes_written = 0

    # -- producer side

    def write_batch(self, batch: pa.RecordBatch | pa.Table | Mapping[str, Any]) -> None:
        """Accept events in any order; rows are released to disk once older than the window."""
        if self._closed:
            raise ValueError(f"write_batch on the closed writer of {self.path}")
        table = to_table(batch)
        if not table.num_rows:
            return
        with _stop_signals_deferred():
            self._hold(table)

    def _hold(self, table: pa.Table) -> None:
        """Add ``table`` to the held rows and release what the window and the memory cap allow."""
        ts = np.sort(table.column("ts_ns").to_numpy())
        self._newest_ts = max(self._newest_ts, int(ts[-1]))
        self._pending.append(table)
        self._pending_ts.append(ts)
        self._pending_rows += table.num_rows
        self.events_written += table.num_rows
        groups = self._row_group_rows
        due = time.monotonic() - self._last_flush >= self._flush_interval_s
        if self._pending_rows >= groups or due:
            ready = self._rows_before(self._newest_ts - self._window_ns)
            self._release(ready if due else ready - ready % groups)
        overflow = self._pending_rows - _MAX_HELD_GROUPS * groups
        if overflow > 0:
            # The window holds more rows than memory should: release the oldest whole groups
            # anyway.  Rows that still arrive before them become late rows, merged at close.
            self._release(-(-overflow // groups) * groups)

    def update_metadata(self, **items: Any) -> None:
        """Merge ``items`` into the metadata (top-level keys replace); ``lost`` also sets ``lost_total``."""
        if "lost" in items and "lost_total" not in items:
            items["lost_total"] = sum(int(v) for v in items["lost"].values())
        self._metadata.update(json.loads(_metadata_bytes(items)))  # plain JSON values, or TypeError here

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self._metadata)

    # -- release and segments

    def _rows_before(self, cutoff_ts: int) -> int:
        """Pending rows with ts_ns < cutoff_ts, counted without sorting (each chunk's ts are sorted)."""
        return sum(int(np.searchsorted(ts, cutoff_ts, side="left")) for ts in self._pending_ts)

    def _release(self, rows: int) -> None:
        """Write the ``rows`` oldest pending rows as sorted segments of at most one row group."""
        self._last_flush = time.monotonic()
        if rows <= 0:
            return
        table = _sorted(pa.concat_tables(self._pending))
        for start in range(0, rows, self._row_group_rows):
            self._write_segment(table.slice(start, min(self._row_group_rows, rows - start)))
        rest = table.slice(rows)
        self._pending = [rest] if rest.num_rows else []
        self._pending_ts = [rest.column("ts_ns").to_numpy()] if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def _write_segment(self, table: pa.Table) -> None:
        """One sorted row group as a complete Parquet file, renamed into place once whole."""
        first, last = _key_at(table, 0), _key_at(table, table.num_rows - 1)
        if self._flushed_last is not None and first < self._flushed_last:
            # Rows older than something already flushed: beyond the window.  The final merge
            # places them; count them so the metadata says the window was too small.
            self._late_rows += _rows_up_to(table, self._flushed_last)
            self._metadata["reorder"] = {"window_ns": self._window_ns, "late_rows": self._late_rows}
        self._flushed_last = max(last, self._flushed_last or last)
        segment = _Segment(
            self._partial / f"seg-{len(self._segments):06d}.parquet", first, last, table.num_rows, self._row_group_rows
        )
        _write_segment_file(segment, table, self._metadata)
        self._segments.append(segment)
        self.bytes_written += segment.path.stat().st_size

    # -- finalizing

    def close(self, complete: bool = True) -> Path:
        """Flush everything, merge the segments into the final file and remove them."""
        if self._closed:
            return self.path
        self._closed = True
        # A Ctrl-C during close (the first one is usually what called it) waits until the file is
        # whole; only SIGKILL stops a merge, and then closing.json lets repair finish the job.
        with _stop_signals_deferred():
            self._release(self._pending_rows)
            self._metadata.setdefault("reorder", {"window_ns": self._window_ns, "late_rows": self._late_rows})
            self._metadata["complete"] = complete
            # Every event is in a segment now: if the merge below dies, repair finds the final
            # metadata here and knows nothing was lost.
            closing = self._partial / _CLOSING_NAME
            closing.with_suffix(".tmp").write_bytes(_metadata_bytes(self._metadata))
            os.replace(closing.with_suffix(".tmp"), closing)
            _write_merged(self._segments, self.path, self._metadata, self._row_group_rows)
            shutil.rmtree(self._partial)
            self.bytes_written = self.path.stat().st_size
        return self.path

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self._metadata.setdefault("stop_reason", exc_type.__name__)
        stopped = exc_type is None or issubclass(exc_type, (KeyboardInterrupt, SystemExit))
        self.close(complete=stopped)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _open_parquet(path: Path) -> pq.ParquetFile:
    """The Parquet file at ``path`` or a one-line TraceFileError saying why it is not one."""
    if not path.exists():
        if partial_dir(path).is_dir():
            raise TraceFileError(
                f"{path} was never finalized (recorder killed?); its flushed events are in "
                f"{partial_dir(path)}: run 'mmutrace repair {path}'"
            )
        raise TraceFileError(f"{path}: no such file")
    if path.is_dir():
        if path.name.endswith(".partial"):
            raise TraceFileError(f"{path} holds an unfinished recording's segments: run 'mmutrace repair {path}'")
        raise TraceFileError(f"{path} is a directory, not a trace file")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PAR1":
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TraceFileError(f"{path}: truncated or corrupt Parquet file ({reason})") from None
        raise TraceFileError(f"{path}: not a Parquet file") from None


def _trace_metadata(path: Path, kv: Mapping[bytes, bytes] | None) -> dict[str, Any]:
    """The validated mmutrace metadata document of a Parquet file's key/value metadata."""
    raw = (kv or {}).get(schema.METADATA_KEY)
    if raw is None:
        raise TraceFileError(f"{path}: a Parquet file but not an mmutrace trace (no '{schema.METADATA_KEY.decode()}' metadata)")
    try:
        metadata = json.loads(raw)
    except ValueError:
        raise TraceFileError(f"{path}: corrupt mmutrace metadata (not JSON)") from None
    if not isinstance(metadata, dict) or "schema_version" not in metadata:
        raise TraceFileError(f"{path}: corrupt mmutrace metadata (no schema_version)")
    version = metadata["schema_version"]
    if version != schema.SCHEMA_VERSION:
        raise TraceFileError(
            f"{path}: schema_version {version!r} is not the one this mmutrace reads ({schema.SCHEMA_VERSION})"
        )
    return metadata


class TraceReader:
    """A validated trace file, read lazily row group by row group."""

    def __init__(self, path: Path, file: pq.ParquetFile, metadata: dict[str, Any]) -> None:
        self.path = path
        self.metadata = metadata
        self._file = file

    @property
    def num_rows(self) -> int:
        return self._file.metadata.num_rows

    @property
    def num_row_groups(self) -> int:
        return self._file.num_row_groups

    @property
    def schema(self) -> pa.Schema:
        return self._file.schema_arrow

    def iter_batches(self, columns: list[str] | None = None, batch_rows: int | None = None) -> Iterator[pa.RecordBatch]:
        """Batches in file order, one row group in memory at a time."""
        for group in range(self.num_row_groups):
            table = self._read(lambda: self._file.read_row_group(group, columns=columns))
            yield from table.to_batches(max_chunksize=batch_rows)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """The whole file (or some columns) in memory: for small traces and tests."""
        return self._read(lambda: self._file.read(columns=columns))

    def _read(self, read: Callable[[], pa.Table]) -> pa.Table:
        try:
            return read()
        except (pa.ArrowException, OSError) as exc:
            raise TraceFileError(f"{self.path}: corrupt data ({str(exc).splitlines()[0]})") from None

    def event_counts(self) -> dict[str, int]:
        """Rows per event name, in catalogue order, for the events present."""
        counts: dict[str, int] = {}
        for batch in self.iter_batches(columns=["event"]):
            for item in pc.value_counts(batch.column(0)).to_pylist():
                counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
        order = {e.name: i for i, e in enumerate(schema.EVENTS)}
        return dict(sorted(counts.items(), key=lambda kv: order.get(kv[0], len(order))))

    @property
    def span_ns(self) -> int:
        """Last minus first event timestamp (0 for an empty trace), from the row-group statistics."""
        if not self.num_rows:
            return 0
        ts = self._file.schema_arrow.get_field_index("ts_ns")
        meta = self._file.metadata
        first = meta.row_group(0).column(ts).statistics
        last = meta.row_group(meta.num_row_groups - 1).column(ts).statistics
        if first is None or last is None or not (first.has_min_max and last.has_min_max):
            ends = [self._read(lambda: self._file.read_row_group(g, columns=["ts_ns"])) for g in (0, meta.num_row_groups - 1)]
            return int(pc.max(ends[1].column(0)).as_py() - pc.min(ends[0].column(0)).as_py())
        return int(last.max - first.min)

    @property
    def lost_total(self) -> int:
        """Events the recorder knows it lost, all CPUs."""
        if "lost_total" in self.metadata:
            return int(self.metadata["lost_total"])
        return sum(int(v) for v in (self.metadata.get("lost") or {}).values())


def open_trace(path: str | os.PathLike[str]) -> TraceReader:
    """Open and validate a trace; TraceFileError (one line) when it is not a readable trace."""
    path = Path(path)
    file = _open_parquet(path)
    metadata = _trace_metadata(path, file.metadata.metadata)
    missing = [f.name for f in schema.COMMON_COLUMNS if f.name not in file.schema_arrow.names]
    if missing:
        raise TraceFileError(f"{path}: trace lacks columns {', '.join(missing)}")
    return TraceReader(path, file, metadata)


# --------------------------------------------------------------------------------------------
# Repair
# --------------------------------------------------------------------------------------------


def repair(partial_path: str | os.PathLike[str], metadata_updates: Mapping[str, Any] | None = None,
           note_extra: str | None = None) -> Path:
    """Merge what a killed writer flushed into a valid trace; returns its path.

    ``metadata_updates`` are facts the producer saved beside the segments (e.g. the recorder's loss
    counters), merged into the recovered metadata; ``note_extra`` is added to the repair note.

    ``partial_path`` is the trace path or its ``.NAME.parquet.partial`` directory.  The result is
    ``complete: false`` unless the writer had already flushed everything and died in the merge at
    close.  Segments that cannot be read (the one being written when the writer died is only ever a
    ``.tmp``) are skipped and named in the metadata's ``repair`` note.
    """
    given = Path(partial_path)
    if given.is_dir():
        partial, final = given, _final_path_of(given)
    else:
        partial, final = partial_dir(given), given
    if not partial.is_dir():
        if final.exists():
            open_trace(final)
            raise UsageError(f"{final} is a finalized trace; there is nothing to repair")
        raise UsageError(f"{final}: no such trace and no unfinished recording ({partial})")
    if final.exists():
        # The writer died after renaming the final file into place and before removing segments.
        open_trace(final)
        shutil.rmtree(partial)
        return final
    segments: list[_Segment] = []
    skipped: list[str] = []
    for path in sorted(partial.glob(_SEGMENT_GLOB)):
        try:
            segments.append(_Segment.load(path))
        except (pa.ArrowException, OSError, KeyError, ValueError):
            skipped.append(path.name)
    if not segments:
        if not skipped:  # the writer died before its first flush: there is nothing to keep
            shutil.rmtree(partial)
            raise TraceFileError(f"{final}: the writer flushed no events before it died; removed {partial}")
        raise TraceFileError(f"{partial}: no readable segment to recover ({', '.join(skipped)} unreadable)")
    closing = partial / _CLOSING_NAME
    if closing.exists() and not skipped:
        metadata = _trace_metadata(closing, {schema.METADATA_KEY: closing.read_bytes()})
        note = "the writer died while merging at close, after flushing every event: nothing is lost"
    else:
        metadata = _trace_metadata(segments[-1].path, pq.read_metadata(segments[-1].path).metadata)
        metadata["complete"] = False
        metadata.setdefault("stop_reason", "killed")
        note = "recovered the segments a killed writer had flushed; later events are lost"
    metadata.update(metadata_updates or {})
    if note_extra:
        note = f"{note}; {note_extra}"
    metadata["repair"] = {"segments": len(segments), "rows": sum(s.rows for s in segments), "skipped": skipped, "note": note}
    _write_merged(segments, final, metadata, segments[-1].row_group_rows)
    shutil.rmtree(partial)
    return final
