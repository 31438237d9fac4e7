"""`mmutrace info` and `mmutrace repair` through the real command line, on real trace files."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmutrace import schema, storage
from mmutrace.cli import main

#: Events per kind of the trace every test here writes (two CPUs, interleaved).
COUNTS = {"kvm_mmu_get_page": 7, "kvm_mmu_set_spte": 11, "kvm_exit": 5, "kvm_entry": 5}
LOST = {"0": 2, "1": 5}


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def mmutrace(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Run]:
    """Run the command line's ``main`` in-process (argv, exit status, stdout, stderr)."""

    def run(*args: str) -> Run:
        monkeypatch.setattr(sys, "argv", ["mmutrace", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        out = capsys.readouterr()
        return Run(code, out.out, out.err)

    return run


def known_trace(path: Path) -> tuple[Path, int, int]:
    """A trace with COUNTS events and LOST losses; returns it with its first and last ts_ns."""
    names = np.array([name for name, n in COUNTS.items() for _ in range(n)])
    rows = len(names)
    ts = 5_000 + np.arange(rows, dtype=np.uint64)[::-1] * 37  # delivered newest first
    batch = {
        "ts_ns": ts, "cpu": (np.arange(rows) % 2).astype(np.uint16), "seq": np.arange(rows, dtype=np.uint32),
        "pid": np.full(rows, 100, np.int32), "tid": np.full(rows, 101, np.int32), "event": names,
    }
    with storage.TraceWriter(path, {"recorder": "test", "kernel_release": "6.18.44"}) as writer:
        writer.write_batch(batch)
        writer.update_metadata(lost=LOST)
    return path, int(ts.min()), int(ts.max())


def test_info_json_reports_what_was_written(tmp_path: Path, mmutrace: Callable[..., Run]) -> None:
    path, first, last = known_trace(tmp_path / "t.parquet")
    proc = mmutrace("info", str(path), "--json")
    assert proc.code == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["events"] == sum(COUNTS.values())
    assert info["lost"] == 7
    assert info["by_event"] == COUNTS
    assert info["span_ns"] == last - first
    assert info["bytes"] == path.stat().st_size and info["row_groups"] == 1
    assert info["metadata"] == {
        "recorder": "test", "kernel_release": "6.18.44", "schema_version": schema.SCHEMA_VERSION,
        "complete": True, "lost": LOST, "lost_total": 7, "reorder": {"window_ns": 200_000_000, "late_rows": 0},
    }


def test_info_json_through_the_real_entry_point(tmp_path: Path) -> None:
    path, _, _ = known_trace(tmp_path / "t.parquet")
    proc = subprocess.run([sys.executable, "-c", "from mmutrace.cli import main; main()", "info", str(path), "--json"],
                          capture_output=True, text=True)
    assert (proc.returncode, json.loads(proc.stdout)["by_event"]) == (0, COUNTS)
    proc = subprocess.run([sys.executable, "-c", "from mmutrace.cli import main; main()", "info", str(path) + "x"],
                          capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (2, f"mmutrace: {path}x: no such file\n")


def test_info_text_shows_counts_and_losses_loudly(tmp_path: Path, mmutrace: Callable[..., Run]) -> None:
    path, first, last = known_trace(tmp_path / "t.parquet")
    proc = mmutrace("info", str(path))
    assert proc.code == 0, proc.stderr
    assert "28 events in 1 row groups" in proc.stdout
    assert "LOST 7 EVENTS (cpu0: 2, cpu1: 5)" in proc.stdout
    assert f"({last - first:,} ns)" in proc.stdout
    for name, n in COUNTS.items():
        assert any(line.split() == [name, str(n)] for line in proc.stdout.splitlines()), name
    assert any(line.split() == ["kernel_release", "6.18.44"] for line in proc.stdout.splitlines())


def test_info_of_an_empty_trace(tmp_path: Path, mmutrace: Callable[..., Run]) -> None:
    path = tmp_path / "empty.parquet"
    storage.TraceWriter(path, {"recorder": "test"}).close()
    info = json.loads(mmutrace("info", str(path), "--json").stdout)
    assert (info["events"], info["lost"], info["by_event"], info["span_ns"], info["row_groups"]) == (0, 0, {}, 0, 0)


def bad_inputs(tmp_path: Path) -> dict[str, Path]:
    good, _, _ = known_trace(tmp_path / "good.parquet")
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[:-100])
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not a trace at all\n" * 10)
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"a": [1]}), foreign)
    future = tmp_path / "future.parquet"
    table = pq.read_table(good)
    meta = {**json.loads(table.schema.metadata[schema.METADATA_KEY]), "schema_version": 999}
    pq.write_table(table.replace_schema_metadata({schema.METADATA_KEY: json.dumps(meta)}), future)
    return {"missing": tmp_path / "nope.parquet", "truncated": truncated, "garbage": garbage,
            "foreign": foreign, "future": future, "directory": tmp_path}


@pytest.mark.parametrize("kind", ["missing", "truncated", "garbage", "foreign", "future", "directory"])
def test_info_bad_input_is_one_line_exit_2(tmp_path: Path, kind: str, mmutrace: Callable[..., Run]) -> None:
    path = bad_inputs(tmp_path)[kind]
    proc = mmutrace("info", str(path), "--json")
    assert (proc.code, proc.stdout) == (2, "")
    assert proc.stderr.startswith(f"mmutrace: {path}") and proc.stderr.count("\n") == 1, proc.stderr


def test_repair_command_recovers_an_abandoned_recording(tmp_path: Path, mmutrace: Callable[..., Run]) -> None:
    path = tmp_path / "t.parquet"
    writer = storage.TraceWriter(path, {"recorder": "test"}, row_group_rows=10, reorder_window_ns=0)
    rows = 35
    writer.write_batch({
        "ts_ns": np.arange(rows, dtype=np.uint64), "cpu": np.zeros(rows, np.uint16),
        "seq": np.arange(rows, dtype=np.uint32), "pid": np.ones(rows, np.int32), "tid": np.ones(rows, np.int32),
        "event": np.array(["kvm_exit"] * rows),
    })
    del writer  # never closed: as if the recorder had been killed

    proc = mmutrace("info", str(path))
    assert proc.code == 2 and f"run 'mmutrace repair {path}'" in proc.stderr
    proc = mmutrace("repair", str(path))
    assert proc.code == 0, proc.stderr
    assert proc.stdout == f"{path}: recovered 30 events from 3 segments (complete: false)\n"
    info = json.loads(mmutrace("info", str(path), "--json").stdout)
    assert (info["events"], info["metadata"]["complete"], info["metadata"]["repair"]["rows"]) == (30, False, 30)
    assert "INCOMPLETE (killed)" in mmutrace("info", str(path)).stdout

    proc = mmutrace("repair", str(path))
    assert (proc.code, proc.stderr) == (2, f"mmutrace: {path} is a finalized trace; there is nothing to repair\n")


def test_repair_bad_input_is_one_line_exit_2(tmp_path: Path, mmutrace: Callable[..., Run]) -> None:
    proc = mmutrace("repair", str(tmp_path / "nope.parquet"))
    assert (proc.code, proc.stdout) == (2, "")
    assert proc.stderr == f"mmutrace: {tmp_path / 'nope.parquet'}: no such trace and no unfinished recording ({tmp_path / '.nope.parquet.partial'})\n"
    proc = mmutrace("repair", str(tmp_path))
    assert proc.code == 2 and proc.stderr == f"mmutrace: {tmp_path} is not a trace's segment directory (.NAME.parquet.partial)\n"
