"""Trace storage on real Parquet files: round trips, ordering, crash safety, repair, bad files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmutrace import schema, storage
from mmutrace.errors import TraceFileError, UsageError

DOCS = Path(__file__).resolve().parent.parent / "docs" / "schema.md"

#: One shadow-MMU fault as the host records it (docs/schema.md "Encodings").
SHADOW_FAULT = (
    ("kvm_exit", "kvm_mmu_pagetable_walk")
    + ("kvm_mmu_paging_element",) * 4
    + ("kvm_mmu_spte_requested", "kvm_mmu_get_page", "kvm_mmu_set_spte", "kvm_entry")
)


def shadow_fault_stream(faults: int, seed: int = 0) -> pa.Table:
    """A realistic event stream: ``faults`` shadow faults on vCPU 0, each a fault's 10 events.

    ts deltas 100-700 ns, per-CPU seq, guest addresses walking memory page by page with gaps, guest
    PTEs and SPTEs derived from them, the quota growing by one page every 512 faults.
    """
    rng = np.random.default_rng(seed)
    k = len(SHADOW_FAULT)
    n = faults * k
    event = np.tile(np.array(SHADOW_FAULT), faults)
    gva = (0x400000 + np.cumsum(rng.integers(1, 4, faults)) * 4096).astype(np.uint64)
    gfn = gva >> np.uint64(12)
    used = np.arange(faults, dtype=np.uint64) // np.uint64(512)
    columns: dict[str, object] = {
        "ts_ns": (10**9 + np.cumsum(rng.integers(100, 700, n))).astype(np.uint64),
        "cpu": np.zeros(n, np.uint16),
        "seq": np.arange(n, dtype=np.uint32),
        "pid": np.full(n, 4242, np.int32),
        "tid": np.full(n, 4243, np.int32),
        "vm": np.full(n, 0xFFFF888812340000, np.uint64),
        "vcpu": np.zeros(n, np.int32),
        "event": event,
    }
    # Per event kind: column -> one value per fault (or per paging element).
    fills: dict[str, dict[str, object]] = {
        "kvm_exit": {"exit_reason": 14, "rip": 0x401000, "info1": gva, "info2": 0, "error_code": 4},
        "kvm_mmu_pagetable_walk": {"addr": gva, "error_code": 4},
        "kvm_mmu_paging_element": {
            "spte": ((np.repeat(gfn, 4) + np.uint64(0x100)) << np.uint64(12)) | np.uint64(0x67),
            "level": np.tile(np.array([4, 3, 2, 1], np.uint8), faults),
        },
        "kvm_mmu_spte_requested": {
            "gfn": gfn, "pfn": gfn + np.uint64(0x200000), "level": 1, "addr": gva, "error_code": 4,
            "max_level": 3, "req_level": 1, "map_writable": True, "prefetch": False, "slot_id": 0,
            "slot_base_gfn": 0, "slot_npages": 262144, "slot_hva": 0x7F0000000000, "slot_flags": 0,
            "mmu_used": used, "mmu_max": 4096,
        },
        "kvm_mmu_get_page": {
            "mmu_valid_gen": 0, "gfn": gfn & ~np.uint64(511), "role": 0x1E1, "root_count": 0, "unsync": False,
            "created": False, "sp": 0xFFFF888200000000, "mmu_used": used, "mmu_max": 4096,
        },
        "kvm_mmu_set_spte": {
            "gfn": gfn, "level": 1, "sptep": np.uint64(0xFFFF888100000000) + (gfn & np.uint64(511)) * np.uint64(8),
            "spte": ((gfn + np.uint64(0x200000)) << np.uint64(12)) | np.uint64(0x8000000000000A77),
        },
        "kvm_entry": {"rip": 0x401000, "mmu_used": used, "mmu_max": 4096},
    }
    for name in {col for fill in fills.values() for col in fill}:
        values = np.zeros(n, schema.COLUMN_TYPES[name].to_pandas_dtype())
        valid = np.zeros(n, bool)
        for kind, fill in fills.items():
            if name in fill:
                rows = event == kind
                values[rows] = fill[name]
                valid[rows] = True
        columns[name] = pa.array(values, schema.COLUMN_TYPES[name], mask=~valid)
    return storage.to_table(columns)


def write(path: Path, tables: list[pa.Table], metadata: dict | None = None, **options) -> Path:
    with storage.TraceWriter(path, metadata or {"recorder": "test"}, **options) as writer:
        for table in tables:
            writer.write_batch(table)
    return path


def sort_rows(table: pa.Table) -> pa.Table:
    return table.sort_by([(name, "ascending") for name in schema.SORT_COLUMNS])


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


def extreme_value(field: pa.Field, row: int) -> object:
    """A value per row that exercises the type's range: max, min or a mid value."""
    t = field.type
    if pa.types.is_boolean(t):
        return row % 2 == 0
    if pa.types.is_dictionary(t):
        return schema.EVENTS[row % len(schema.EVENTS)].name
    info = np.iinfo(t.to_pandas_dtype())
    return (int(info.max), int(info.min), 100 + row)[row % 3]


def test_every_column_type_round_trips_with_nulls_and_extremes(tmp_path: Path) -> None:
    rows = 3 * len(schema.EVENTS)
    columns = {}
    for field in schema.ARROW_SCHEMA:
        values = [extreme_value(field, row) for row in range(rows)]
        if field.nullable:
            values = [None if row % 5 == 4 else v for row, v in enumerate(values)]
        columns[field.name] = pa.array(values, pa.string() if field.name == "event" else field.type)
    columns["ts_ns"] = pa.array(range(rows), pa.uint64())  # distinct keys: a defined order
    written = storage.to_table(columns)
    trace = storage.open_trace(write(tmp_path / "t.parquet", [written]))
    assert trace.read().equals(written)
    assert trace.read().schema.remove_metadata().equals(schema.ARROW_SCHEMA)
    assert trace.read()["event"].to_pylist() == columns["event"].to_pylist()


def test_dict_of_numpy_columns_fills_missing_columns_with_nulls(tmp_path: Path) -> None:
    batch = {
        "ts_ns": np.array([30, 10, 20], np.uint64),
        "cpu": np.array([1, 0, 0], np.uint16),
        "seq": np.array([0, 0, 1], np.uint32),
        "pid": np.array([7, 7, 7], np.int32),
        "tid": np.array([8, 8, 9], np.int32),
        "event": np.array(["kvm_exit", "kvm_entry", "kvm_mmu_get_page"]),
        "gfn": np.array([0, 0, 0x1234], np.uint64),
    }
    recorder_events = pa.DictionaryArray.from_arrays(pa.array([2, 1], pa.int8()), storage.EVENT_NAMES)
    later = {name: values[:2] for name, values in batch.items()} | {"event": recorder_events, "ts_ns": np.array([40, 50], np.uint64)}
    table = storage.open_trace(write(tmp_path / "t.parquet", [batch, later])).read()[:3]
    assert table["ts_ns"].to_pylist() == [10, 20, 30]
    assert table["event"].to_pylist() == ["kvm_entry", "kvm_mmu_get_page", "kvm_exit"]
    assert table["gfn"].to_pylist() == [0, 0x1234, 0]
    assert table["tid"].to_pylist() == [8, 9, 8]
    assert table["spte"].null_count == 3 and table["vm"].null_count == 3
    assert storage.open_trace(tmp_path / "t.parquet").read()["event"][3:].to_pylist() == [
        schema.EVENTS[2].name, schema.EVENTS[1].name]


def test_batch_with_unknown_event_or_column_is_refused(tmp_path: Path) -> None:
    base = {"ts_ns": [1], "cpu": [0], "seq": [0], "pid": [1], "tid": [1]}
    with storage.TraceWriter(tmp_path / "t.parquet", {}) as writer:
        with pytest.raises(ValueError, match="kvm_bogus"):
            writer.write_batch({**base, "event": ["kvm_bogus"]})
        with pytest.raises(ValueError, match="colour"):
            writer.write_batch({**base, "event": ["kvm_exit"], "colour": [1]})
        with pytest.raises(ValueError, match="seq"):
            writer.write_batch({"ts_ns": [1], "cpu": [0], "pid": [1], "tid": [1], "event": ["kvm_exit"]})
        with pytest.raises(ValueError, match="column event has nulls"):
            writer.write_batch({**base, "event": [None]})
        with pytest.raises(pa.ArrowInvalid):
            writer.write_batch({**base, "cpu": np.array([70000]), "event": ["kvm_exit"]})
    assert storage.open_trace(tmp_path / "t.parquet").num_rows == 0


def test_metadata_round_trips_with_lost_total_and_completion(tmp_path: Path) -> None:
    metadata = {"recorder": "bcc", "kernel_release": "6.18.44", "kvm_params": {"tdp_mmu": "N"}, "command": ["a", "b"]}
    path = tmp_path / "t.parquet"
    with storage.TraceWriter(path, metadata) as writer:
        writer.write_batch(shadow_fault_stream(10))
        writer.update_metadata(lost={"0": np.uint64(3), "1": 4}, markers=[{"ts_ns": 5, "text": "phase 1"}])
        with pytest.raises(TypeError, match="object"):
            writer.update_metadata(probes=object())
    trace = storage.open_trace(path)
    assert trace.metadata == {
        **metadata,
        "schema_version": schema.SCHEMA_VERSION,
        "complete": True,
        "lost": {"0": 3, "1": 4},
        "lost_total": 7,
        "markers": [{"ts_ns": 5, "text": "phase 1"}],
        "reorder": {"window_ns": 200_000_000, "late_rows": 0},
    }
    assert trace.lost_total == 7
    assert set(trace.metadata) <= set(schema.METADATA_KEYS)


def test_reader_streams_bounded_row_groups_and_counts(tmp_path: Path) -> None:
    stream = shadow_fault_stream(1000)
    trace = storage.open_trace(write(tmp_path / "t.parquet", [stream], row_group_rows=3000))
    assert (trace.num_rows, trace.num_row_groups) == (10_000, 4)
    assert [b.num_rows for b in trace.iter_batches(columns=["ts_ns"], batch_rows=2000)] == [2000, 1000] * 3 + [1000]
    assert trace.event_counts() == {
        "kvm_mmu_pagetable_walk": 1000, "kvm_mmu_paging_element": 4000, "kvm_mmu_get_page": 1000,
        "kvm_mmu_spte_requested": 1000, "kvm_mmu_set_spte": 1000, "kvm_entry": 1000, "kvm_exit": 1000,
    }
    ts = stream["ts_ns"].to_numpy()
    assert trace.span_ns == int(ts[-1] - ts[0])
    file = pq.ParquetFile(trace.path)
    assert [(c.column_index, c.descending) for c in file.metadata.row_group(0).sorting_columns] == [(0, False), (1, False), (2, False)]
    assert file.metadata.row_group(0).column(0).compression == "ZSTD"


# --------------------------------------------------------------------------------------------
# Ordering
# --------------------------------------------------------------------------------------------


def two_cpu_stream(rows_per_cpu: int) -> pa.Table:
    """Two CPUs' events interleaved in time, with exact timestamp ties across CPUs."""
    a = shadow_fault_stream(rows_per_cpu // 10, seed=1)
    b = shadow_fault_stream(rows_per_cpu // 10, seed=2)
    ts_b = a["ts_ns"].to_numpy().copy()
    ts_b[1::2] += 50  # half the rows tie with CPU 0, half fall between
    b = b.set_column(0, "ts_ns", pa.array(ts_b)).set_column(1, "cpu", pa.array(np.ones(len(b), np.uint16)))
    return pa.concat_tables([a, storage.to_table(b)])


def test_out_of_order_within_the_window_comes_out_sorted(tmp_path: Path) -> None:
    stream = two_cpu_stream(20_000)  # 8 ms of events
    # Deliver CPU by CPU in 700-row chunks (~0.3 ms), CPU 1 first: per-CPU buffers read in turn.
    a, b = stream.slice(0, 20_000), stream.slice(20_000)
    chunks = [t.slice(i, 700) for i in range(0, 20_000, 700) for t in (b, a)]
    path = write(tmp_path / "t.parquet", chunks, row_group_rows=1024, reorder_window_ns=10**6)
    trace = storage.open_trace(path)
    assert trace.read().equals(sort_rows(stream))
    assert trace.metadata["reorder"] == {"window_ns": 10**6, "late_rows": 0}
    assert trace.num_row_groups == 40


def test_rows_later_than_the_window_are_placed_and_counted(tmp_path: Path) -> None:
    stream = shadow_fault_stream(2000)
    late = storage.to_table(stream.slice(0, 100).set_column(1, "cpu", pa.array(np.ones(100, np.uint16))))  # CPU 1
    # A 1 us window: by the time the old rows arrive, 20 segments (later than them) are on disk.
    path = write(tmp_path / "t.parquet", [stream, late], row_group_rows=1000, reorder_window_ns=1000)
    trace = storage.open_trace(path)
    assert trace.read().equals(sort_rows(pa.concat_tables([stream, late])))
    assert trace.metadata["reorder"] == {"window_ns": 1000, "late_rows": 100}
    assert trace.num_row_groups == 21


def test_a_window_larger_than_memory_allows_still_flushes(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    stream = shadow_fault_stream(300)
    writer = storage.TraceWriter(path, {}, row_group_rows=100, reorder_window_ns=10**18, flush_interval_s=3600)
    writer.write_batch(stream.slice(1000))
    segments = len(list(storage.partial_dir(path).glob("seg-*.parquet")))
    writer.write_batch(stream.slice(0, 1000))  # older than everything flushed
    writer.close()
    trace = storage.open_trace(path)
    assert segments == 20 - storage._MAX_HELD_GROUPS
    assert trace.read().equals(stream)
    assert trace.metadata["reorder"]["late_rows"] == 1000


# --------------------------------------------------------------------------------------------
# Crash safety
# --------------------------------------------------------------------------------------------


def test_keyboard_interrupt_leaves_a_complete_file_saying_so(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    stream = shadow_fault_stream(100)
    with pytest.raises(KeyboardInterrupt):
        with storage.TraceWriter(path, {}) as writer:
            writer.write_batch(stream)
            raise KeyboardInterrupt
    trace = storage.open_trace(path)
    assert trace.read().equals(stream)
    assert (trace.metadata["complete"], trace.metadata["stop_reason"]) == (True, "KeyboardInterrupt")
    assert not storage.partial_dir(path).exists()


def test_a_producer_exception_leaves_a_valid_incomplete_file(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    with pytest.raises(RuntimeError):
        with storage.TraceWriter(path, {}) as writer:
            writer.write_batch(shadow_fault_stream(10))
            raise RuntimeError("probe detached")
    trace = storage.open_trace(path)
    assert (trace.num_rows, trace.metadata["complete"], trace.metadata["stop_reason"]) == (100, False, "RuntimeError")


INTERRUPTED_WRITER = textwrap.dedent(
    """
    import signal, sys
    import numpy as np
    from mmutrace import storage

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # what the recorder does
    rows = 1000
    try:
        with storage.TraceWriter(sys.argv[1], {}, row_group_rows=4000, reorder_window_ns=0) as writer:
            for i in range(10**9):
                batch = {"ts_ns": np.arange(i * rows, (i + 1) * rows, dtype=np.uint64), "cpu": np.zeros(rows, np.uint16),
                         "seq": np.arange(rows, dtype=np.uint32), "pid": np.ones(rows, np.int32),
                         "tid": np.ones(rows, np.int32), "event": np.array(["kvm_exit"] * rows)}
                writer.write_batch(batch)
                if i == 10:
                    print("flushed", flush=True)
    except KeyboardInterrupt:
        print(writer.events_written, flush=True)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signalled_writer_process_leaves_a_complete_file(tmp_path: Path, signum: int) -> None:
    path = tmp_path / "t.parquet"
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "flushed\n"
    proc.send_signal(signum)
    written = int(proc.stdout.readline())
    assert proc.wait(timeout=60) == 0
    trace = storage.open_trace(path)
    assert trace.num_rows == written and written >= 11_000
    assert trace.read(columns=["ts_ns"])["ts_ns"].to_pylist() == list(range(written))
    assert (trace.metadata["complete"], trace.metadata["stop_reason"]) == (True, "KeyboardInterrupt")


def test_a_signal_inside_the_writer_is_delivered_after_its_state_is_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGINT while segments are written (in write_batch, then again in close): KeyboardInterrupt
    comes out after the writer's state is whole, so no row is lost or written twice and close
    still finishes the file."""
    path = tmp_path / "t.parquet"
    stream = shadow_fault_stream(100)
    sorted_rows = storage._sorted

    def sort_then_signal(table: pa.Table) -> pa.Table:
        signal.raise_signal(signal.SIGINT)
        return sorted_rows(table)

    with pytest.raises(KeyboardInterrupt):
        with storage.TraceWriter(path, {}, row_group_rows=300, reorder_window_ns=0) as writer:
            monkeypatch.setattr(storage, "_sorted", sort_then_signal)
            writer.write_batch(stream)
    assert writer.events_written == 1000
    trace = storage.open_trace(path)
    assert trace.read().equals(stream)
    assert (trace.metadata["complete"], trace.metadata["stop_reason"]) == (True, "KeyboardInterrupt")


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from mmutrace import storage
    path, groups = sys.argv[1], int(sys.argv[2])
    rows = groups * 1000 + 1   # the last row stays in the holdback window
    batch = {"ts_ns": np.arange(rows, dtype=np.uint64) * 10, "cpu": np.zeros(rows, np.uint16),
             "seq": np.arange(rows, dtype=np.uint32), "pid": np.full(rows, os.getpid(), np.int32),
             "tid": np.full(rows, 1, np.int32), "event": np.array(["kvm_exit"] * rows)}
    writer = storage.TraceWriter(path, {"recorder": "test", "command": ["killed"]}, row_group_rows=1000,
                                 reorder_window_ns=0, flush_interval_s=3600)
    writer.write_batch(batch)
    writer.update_metadata(lost={"0": 1})  # after the last flush: not in any segment
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_sigkilled_writer_is_refused_then_repaired_to_its_flushed_groups(tmp_path: Path) -> None:
    path = tmp_path / "killed.parquet"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path), "5"], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert not path.exists()
    with pytest.raises(TraceFileError, match=f"run 'mmutrace repair {path}'"):
        storage.open_trace(path)
    with pytest.raises(UsageError, match="unfinished recording"):
        storage.check_output(path, force=False)

    assert storage.repair(storage.partial_dir(path)) == path
    trace = storage.open_trace(path)
    table = trace.read()
    assert (trace.num_rows, trace.num_row_groups) == (5000, 5)
    assert table["ts_ns"].to_pylist() == [10 * i for i in range(5000)]
    assert trace.metadata["complete"] is False
    assert trace.metadata["command"] == ["killed"] and "lost" not in trace.metadata
    assert trace.metadata["repair"]["segments"] == 5 and trace.metadata["repair"]["rows"] == 5000
    assert not storage.partial_dir(path).exists()


def test_a_merge_that_fails_at_close_is_repaired_as_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.parquet"
    stream = shadow_fault_stream(100)

    def killed_mid_merge(*args: object) -> None:
        raise OSError("no space left on device")

    monkeypatch.setattr(storage, "_write_merged", killed_mid_merge)
    with pytest.raises(OSError):
        write(path, [stream], {"recorder": "test"}, row_group_rows=300)
    monkeypatch.undo()
    assert not path.exists()
    storage.repair(path)
    trace = storage.open_trace(path)
    assert trace.read().equals(stream)
    assert (trace.metadata["complete"], trace.metadata["repair"]["segments"]) == (True, 4)
    assert "nothing is lost" in trace.metadata["repair"]["note"]


def test_repair_skips_a_torn_segment_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    writer = storage.TraceWriter(path, {}, row_group_rows=100, reorder_window_ns=0, flush_interval_s=3600)
    writer.write_batch(shadow_fault_stream(31))  # 3 segments of 100 rows, 10 rows held back
    segments = sorted(storage.partial_dir(path).glob("seg-*.parquet"))
    segments[1].write_bytes(segments[1].read_bytes()[:200])
    storage.repair(path)
    trace = storage.open_trace(path)
    assert trace.num_rows == 200
    assert trace.metadata["repair"]["skipped"] == [segments[1].name]


def test_repair_of_a_writer_that_flushed_nothing_clears_the_way(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    storage.TraceWriter(path, {}).write_batch(shadow_fault_stream(1))  # held back, never flushed
    with pytest.raises(TraceFileError, match="flushed no events"):
        storage.repair(path)
    assert storage.check_output(path, force=False) == path


def test_final_file_never_appears_before_it_is_whole(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    writer = storage.TraceWriter(path, {}, row_group_rows=100, reorder_window_ns=0)
    writer.write_batch(shadow_fault_stream(50))
    assert not path.exists() and len(list(storage.partial_dir(path).glob("seg-*.parquet"))) == 4
    assert writer.bytes_written == sum(p.stat().st_size for p in storage.partial_dir(path).glob("seg-*"))
    assert writer.events_written == 500
    writer.close()
    assert storage.open_trace(path).num_rows == 500
    with pytest.raises(ValueError, match="closed"):
        writer.write_batch(shadow_fault_stream(1))


# --------------------------------------------------------------------------------------------
# Outputs and bad files
# --------------------------------------------------------------------------------------------


def test_check_output_refuses_existing_and_missing_directories(tmp_path: Path) -> None:
    existing = write(tmp_path / "t.parquet", [shadow_fault_stream(1)])
    with pytest.raises(UsageError, match="exists"):
        storage.TraceWriter(existing, {})
    assert storage.check_output(existing, force=True) == existing
    with pytest.raises(UsageError, match=str(tmp_path / "nodir")):
        storage.check_output(tmp_path / "nodir" / "t.parquet", force=False)
    with pytest.raises(UsageError, match="not a directory"):
        storage.check_output(existing / "t.parquet", force=True)
    write(existing, [shadow_fault_stream(2)], force=True)
    assert storage.open_trace(existing).num_rows == 20


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to drop to nobody")
def test_check_output_refuses_an_unwritable_directory() -> None:
    with tempfile.TemporaryDirectory() as directory:  # under /tmp: searchable by nobody
        os.chmod(directory, 0o755)
        code = f"from mmutrace import storage; storage.check_output({directory + '/t.parquet'!r}, False)"
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
            capture_output=True, text=True, cwd=Path(storage.__file__).parent.parent,
        )
    assert f"UsageError: output directory {directory} is not writable" in proc.stderr


def bad_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.parquet"
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        good = write(tmp_path / "good.parquet", [shadow_fault_stream(100)])
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "foreign":
        pq.write_table(pa.table({"x": [1, 2, 3]}), path)
    elif kind == "version":
        table = shadow_fault_stream(1)
        pq.write_table(table.replace_schema_metadata({schema.METADATA_KEY: json.dumps({"schema_version": 999})}), path)
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("random", "not a Parquet file"),
        ("empty", "not a Parquet file"),
        ("truncated", "truncated or corrupt Parquet file"),
        ("foreign", "not an mmutrace trace"),
        ("version", "schema_version 999 is not the one this mmutrace reads (1)"),
    ],
)
def test_bad_files_raise_one_line(tmp_path: Path, kind: str, message: str) -> None:
    path = bad_file(tmp_path, kind)
    with pytest.raises(TraceFileError) as err:
        storage.open_trace(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------
# Size and documentation
# --------------------------------------------------------------------------------------------


def test_shadow_fault_stream_bytes_per_event(tmp_path: Path) -> None:
    """The size target (<= 8 bytes/event); prints the figure docs/schema.md quotes."""
    trace = storage.open_trace(write(tmp_path / "t.parquet", [shadow_fault_stream(100_000)]))
    per_event = trace.path.stat().st_size / trace.num_rows
    print(f"\nshadow-fault stream: {trace.num_rows} events, {per_event:.3f} bytes/event")
    assert per_event <= 8


@pytest.mark.bcc
def test_real_recording_bytes_per_event(tmp_path: Path) -> None:
    """The same figure on a real bcc recording of the touch scenario (docs/schema.md quotes 65536 pages)."""
    path = tmp_path / "touch.parquet"
    proc = subprocess.run(
        [sys.executable, "-c", "from mmutrace.cli import main; main()", "record", "--scenario", "touch",
         "--size", "8192", "-o", str(path)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    trace = storage.open_trace(path)
    per_event = path.stat().st_size / trace.num_rows
    print(f"\nreal touch recording: {trace.num_rows} events, {per_event:.3f} bytes/event")
    assert trace.num_rows > 100_000 and per_event <= 8


def test_schema_doc_embeds_the_event_catalogue_and_lists_every_column_and_key() -> None:
    doc = DOCS.read_text()
    assert schema.event_catalogue_markdown() in doc, "regenerate the table: python -m mmutrace.schema"
    for field in schema.ARROW_SCHEMA:
        assert f"| `{field.name}` | {field.type} | {'yes' if field.nullable else 'no'} |" in doc, field.name
    for field in schema.FIELD_COLUMNS:
        filled = ", ".join(f"`{e.name}`" for e in schema.EVENTS if field.name in e.columns)
        assert f"| `{field.name}` | {field.type} | yes | {filled} |" in doc, f"{field.name} is filled by {filled}"
    assert schema.metadata_keys_markdown() in doc, "regenerate the table: python -m mmutrace.schema"
    assert f"schema version {schema.SCHEMA_VERSION}" in doc.lower()
