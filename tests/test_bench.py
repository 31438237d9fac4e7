"""`mmutrace bench record` and `bench replay` work (their figures are measurements: only what is exact
is asserted; the speeds themselves are in docs/benchmarks.md, never in a test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmutrace.bench_record import bench_record, table_rows
from mmutrace.storage import open_trace
from replay.engine import replay_trace

LAB_TDP = Path(__file__).parent.parent / "examples" / "lab" / "6.1-tdp-bcc" / "memslot_churn.parquet"


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from mmutrace.cli import main; main()", "bench", "replay", *args],
                          capture_output=True, text=True, timeout=300)


def test_replay_bench_on_a_small_lab_trace_repeats_each_job() -> None:
    """A lab TDP trace is far under the 5M-event floor: --min-events 0 --repeat N still times it."""
    proc = _bench(str(LAB_TDP), "--min-events", "0", "--repeat", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    rows = open_trace(LAB_TDP).num_rows
    assert (figures["events"], figures["repeat"]) == (rows, 3)
    assert [figures[job]["events"] for job in ("arrow", "read", "replay")] == [3 * rows] * 3
    expected = replay_trace(LAB_TDP).to_json()
    verdicts = figures["replay"]["verdicts"]
    shared = verdicts.keys() & expected.keys()
    assert verdicts.keys() - shared == {"bulk_events"}  # the one figure the JSON does not carry
    assert {k: verdicts[k] for k in shared} == {k: expected[k] for k in shared}
    assert figures["replay"]["verdicts"]["decisions"] == expected["decisions"] > 0
    assert figures["replay_vs_arrow_read"] > 0 and figures["replay_vs_python_read"] > 0


def test_replay_bench_refuses_what_it_cannot_measure() -> None:
    small = _bench(str(LAB_TDP))
    assert small.returncode == 2 and small.stderr.count("\n") == 1
    assert f"has {open_trace(LAB_TDP).num_rows:,} events; the benchmark needs at least 5,000,000" in small.stderr
    zero = _bench(str(LAB_TDP), "--min-events", "0", "--repeat", "0")
    assert (zero.returncode, zero.stderr) == (2, "mmutrace: --repeat must be at least 1, not 0\n")


@pytest.mark.bcc
def test_record_bench_runs_the_three_configurations_and_loses_nothing() -> None:
    (none, tracefs, bcc), faults = bench_record(2000, repeat=1)
    assert [r.label for r in (none, tracefs, bcc)] == ["none", "tracefs", "bcc"]
    assert faults > 2000  # every page of the touch scenario faults at least once
    assert (tracefs.lost, bcc.lost) == (0, 0)
    assert tracefs.events == tracefs.emitted and bcc.rows == bcc.emitted  # rows + lost = emitted
    assert bcc.rows - bcc.events > 0  # the KVM ioctl rows only bcc sees
    assert bcc.bytes < tracefs.bytes and bcc.cpu_s >= bcc.convert_cpu_s > 0
    rows = table_rows([none, tracefs, bcc], faults)
    assert [r[0] for r in rows] == ["none", "tracefs", "bcc"] and rows[0][2] == rows[0][4] == "1.00"
