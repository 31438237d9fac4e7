"""`mmutrace bench record`: what recording costs the guest, and what it keeps.

One invocation runs the same deterministic scenario (``touch``, same seed and size) three times:

- ``none``: untraced, the baseline;
- ``tracefs``: the kvm/kvmmmu events into a private tracefs instance's binary ring buffer, filtered
  to the scenario's pid, read as ``trace_pipe_raw`` after the run (the cheapest tracefs recording);
- ``bcc``: ``mmutrace record`` with every probe attached, written to Parquet (its CPU time is
  split: the spooling recorder, and the converter child decoding and writing Parquet, mostly after
  the guest stopped; mmutrace.spool).

The guest's speed is measured between the scenario's own ``touch:seq_read`` and ``touch:end``
markers (CLOCK_MONOTONIC, taken by the guest's host thread), so Python set-up of page tables and
the recorder's start-up do not count.  Its CPU time between the same markers (the vCPU thread's
user and system time, probes and tracepoints included) is reported too: on a loaded machine the
wall time also counts waiting for a core, the CPU time only what the guest and its tracing cost.
Faults are the ``kvm_mmu_spte_requested`` events of the bcc run (the scenario is deterministic, so
every run takes the same faults).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mmutrace import schema, storage, tracefs
from mmutrace.errors import HostError
from mmutrace.record import Child, RecordOptions, ScenarioSpec, record

SCENARIO = "touch"
#: trace_pipe_raw pages: a u64 timestamp, then ``commit`` (local_t) whose low 20 bits are the data bytes.
_PAGE_HEADER = struct.Struct("<QQ")
_COMMIT_MASK = (1 << 20) - 1


@dataclass
class RunFigures:
    """One traced (or untraced) run of the scenario."""

    label: str
    guest_s: float
    guest_cpu_s: float
    events: int | None = None  # kvm/kvmmmu events the recorder kept (what both recorders can see)
    emitted: int | None = None  # events the kernel emitted for the process (probe hits / tracefs entries)
    rows: int | None = None  # every event kept (bcc adds the ioctl rows)
    lost: int | None = None
    bytes: int | None = None  # on disk (Parquet) or in the ring buffer (trace_pipe_raw data bytes)
    cpu_s: float | None = None  # recorder CPU time (tracefs: no reader runs during the guest)
    convert_cpu_s: float | None = None  # bcc: the part of cpu_s spent decoding and writing Parquet


def _guest_seconds(texts: list[str], ns: list[int]) -> float:
    """Seconds from the first guest phase's marker to the end marker; ``ns`` is taken at each marker."""
    return (ns[texts.index(f"{SCENARIO}:end")] - ns[texts.index(f"{SCENARIO}:seq_read")]) / 1e9


def _report_times(report: dict) -> tuple[float, float]:
    """Guest wall and CPU seconds from the scenario's report (its --json output)."""
    texts = [text for _, text in report["markers"]]
    return _guest_seconds(texts, [ns for ns, _ in report["markers"]]), _guest_seconds(texts, report["marker_cpu_ns"])


def run_untraced(spec: ScenarioSpec) -> RunFigures:
    child = Child(spec.command(), capture_stdout=True)
    child.release()
    if child.finish(terminate=False) != 0:
        raise HostError(f"the {SCENARIO} scenario failed untraced")
    return RunFigures("none", *_report_times(json.loads(child.stdout)))


class RawTracefs:
    """A private tracefs instance holding a process's kvm/kvmmmu events in its binary ring buffer.

    Nothing reads it while the guest runs; afterwards the per-CPU ``stats`` give how many events
    it holds and lost, and ``trace_pipe_raw`` how many bytes they take.
    """

    def __init__(self, tgid: int, buffer_mb: int) -> None:
        self.tgid, self.buffer_mb = tgid, buffer_mb
        self.instance = tracefs.ensure_mounted() / "instances" / f"mmutrace-bench-{os.getpid()}"
        self.events = tracefs.schema_events()

    def _write(self, name: str, value: str) -> None:
        (self.instance / name).write_text(value)

    def __enter__(self) -> RawTracefs:
        self.instance.mkdir()
        self._write("buffer_size_kb", str(self.buffer_mb * 1024))
        self._write("trace_clock", "mono")
        self._write("options/event-fork", "1")
        self._write("set_event_pid", str(self.tgid))
        for group, event in self.events:
            self._write(f"events/{group}/{event}/enable", "1")
        return self

    def collect(self) -> tuple[int, int, int]:
        """(events held, events lost, data bytes) over all CPUs; stops tracing first."""
        self._write("tracing_on", "0")
        held = lost = data = 0
        for cpu_dir in sorted(self.instance.glob("per_cpu/cpu*")):
            stats = dict(line.split(":", 1) for line in (cpu_dir / "stats").read_text().splitlines() if ":" in line)
            held += int(stats["entries"])
            lost += int(stats["overrun"]) + int(stats.get("dropped events", 0))
            fd = os.open(cpu_dir / "trace_pipe_raw", os.O_RDONLY | os.O_NONBLOCK)
            try:
                while True:
                    try:
                        page = os.read(fd, 4096)
                    except BlockingIOError:
                        break
                    if not page:
                        break
                    data += _PAGE_HEADER.size + (_PAGE_HEADER.unpack_from(page)[1] & _COMMIT_MASK)
            finally:
                os.close(fd)
        return held, lost, data

    def __exit__(self, *exc: object) -> None:
        for group, event in self.events:
            (self.instance / "events" / group / event / "enable").write_text("0")
        self.instance.rmdir()


def run_tracefs(spec: ScenarioSpec, buffer_mb: int) -> RunFigures:
    child = Child(spec.command(), capture_stdout=True)
    try:
        with RawTracefs(child.pid, buffer_mb) as raw:
            child.release()
            status = child.finish(terminate=False)
            held, lost, data = raw.collect()
    finally:
        if child.proc.returncode is None:
            child.finish()
    if status != 0:
        raise HostError(f"the {SCENARIO} scenario failed under tracefs")
    return RunFigures("tracefs", *_report_times(json.loads(child.stdout)), events=held,
                      emitted=held + lost, rows=held, lost=lost, bytes=data)


def run_bcc(spec: ScenarioSpec, directory: Path) -> tuple[RunFigures, int]:
    """The bcc run, and the faults it saw."""
    out = directory / "bench.parquet"
    result = record(RecordOptions(output=out, scenario=spec, force=True))
    if result.child_status != 0:
        raise HostError(f"the {SCENARIO} scenario failed under the bcc recorder")
    counts = storage.open_trace(out).event_counts()
    kvm_events = sum(n for event, n in counts.items() if schema.event_kind(event).group != "ioctl")
    texts = [m["text"] for m in result.metadata["markers"]]
    figures = RunFigures("bcc", _guest_seconds(texts, [m["ts_ns"] for m in result.metadata["markers"]]),
                         _guest_seconds(texts, result.metadata["scenario"]["marker_cpu_ns"]), events=kvm_events,
                         emitted=sum(result.hits.values()), rows=result.events, lost=result.lost,
                         bytes=out.stat().st_size, cpu_s=result.cpu_s,
                         convert_cpu_s=result.convert_cpu_s)
    return figures, result.hits["kvm_mmu_spte_requested"]


def bench_record(size: int, seed: int = 0, buffer_mb: int = 512, repeat: int = 1) -> tuple[list[RunFigures], int]:
    """The three runs and the number of guest faults (see the module docstring).

    With ``repeat`` > 1 the three are run that many times, interleaved, and each keeps its fastest
    guest time, and its least guest CPU time (of any of its runs): on a shared machine the minimum
    is the least disturbed measurement.
    """
    spec = ScenarioSpec(SCENARIO, seed, size)
    best: dict[str, RunFigures] = {}
    least_cpu: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="mmutrace-bench-") as tmp:
        for _ in range(repeat):
            bcc, faults = run_bcc(spec, Path(tmp))
            for run in (run_untraced(spec), run_tracefs(spec, buffer_mb), bcc):
                if run.label not in best or run.guest_s < best[run.label].guest_s:
                    best[run.label] = run
                least_cpu[run.label] = min(least_cpu.get(run.label, run.guest_cpu_s), run.guest_cpu_s)
    for label, run in best.items():
        run.guest_cpu_s = least_cpu[label]
    return [best["none"], best["tracefs"], best["bcc"]], faults


def table_rows(runs: list[RunFigures], faults: int) -> list[list[str]]:
    """The printed table: one row per run, ratios against the untraced run of the same invocation."""
    base, base_cpu = runs[0].guest_s, runs[0].guest_cpu_s

    def opt(value: float | int | None, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    rows = []
    for run in runs:
        per_event = run.bytes / run.rows if run.bytes is not None and run.rows else None
        rows.append([run.label, f"{faults / run.guest_s:,.0f}", f"{run.guest_s / base:.2f}",
                     f"{run.guest_cpu_s:.2f}", f"{run.guest_cpu_s / base_cpu:.2f}",
                     opt(run.events, ","), opt(run.emitted, ","), opt(run.lost, ","),
                     opt(per_event, ".2f"), opt(run.cpu_s, ".2f"), opt(run.convert_cpu_s, ".2f")])
    return rows


TABLE_HEADER = ["tracing", "guest faults/s", "guest time (× none)", "guest CPU s", "guest CPU (× none)",
                "kvm+kvmmmu events kept",
                "events emitted", "lost", "bytes/event", "recorder CPU s", "of which converting"]
