"""tracefs: mounting it, reading event formats, and capturing kvm/kvmmmu events in a private instance.

Other engineers (and other tools) trace on the same host at the same time, so nothing here touches
the top-level buffer: a ``Capture`` makes its own instance under ``instances/``, sets its clock to
``mono`` (the clock of ``bpf_ktime_get_ns`` and ``time.CLOCK_MONOTONIC``, so tracefs and bcc
timestamps compare directly), streams ``trace_pipe`` to a file while it runs (the ring buffer alone
would overflow at a guest's full fault rate) and removes the instance on exit, even on error.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import pyarrow as pa

from mmutrace.errors import HostError, UsageError
from mmutrace.schema import EVENTS, TRACEFS_GROUPS

if TYPE_CHECKING:  # ftrace_text imports this module
    from mmutrace.ftrace_text import ParsedText

TRACEFS = Path("/sys/kernel/tracing")
#: The clock every mmutrace capture uses: CLOCK_MONOTONIC, as bpf_ktime_get_ns().
TRACE_CLOCK = "mono"
DEFAULT_BUFFER_KB = 32768


def is_mounted() -> bool:
    """Whether tracefs is mounted at TRACEFS; HostError when it cannot be looked at (not root)."""
    try:
        return (TRACEFS / "events").is_dir()
    except PermissionError:
        raise HostError(f"{TRACEFS} is not accessible: tracing needs root") from None


def ensure_mounted() -> Path:
    """Return the tracefs mount point, mounting it first when absent (needs root).

    Returns the path; raises HostError with the fix when it cannot be mounted.
    """
    if is_mounted():
        return TRACEFS
    if os.geteuid() != 0:
        raise HostError(f"tracefs is not mounted at {TRACEFS} and mounting it needs root")
    proc = subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True, text=True)
    if proc.returncode != 0 or not (TRACEFS / "events").is_dir():
        raise HostError(f"cannot mount tracefs at {TRACEFS}: {proc.stderr.strip() or 'mount failed'}")
    return TRACEFS


# --------------------------------------------------------------------------------------------
# Event formats (events/<group>/<event>/format)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FormatField:
    """One ``field:`` line of a format file: the C declaration and where it sits in the record."""

    name: str
    ctype: str
    offset: int
    size: int
    signed: bool


@dataclass(frozen=True)
class EventFormat:
    """A parsed ``format`` file: the record layout and the TP_printk text of one tracepoint."""

    name: str
    id: int
    fields: tuple[FormatField, ...]
    print_fmt: str

    def field(self, name: str) -> FormatField | None:
        return next((f for f in self.fields if f.name == name), None)

    def symbols(self) -> dict[str, int]:
        """Every name of every ``__print_symbolic`` table in the print format, with its value.

        This is how printed names (kvm_exit's ``EPT_VIOLATION``, kvm_userspace_exit's
        ``KVM_EXIT_IO``) are turned back into numbers without copying kernel tables by hand.
        Entries such as ``{ 0x040 + 14, "PF excp" }`` and ``{ 6, "KVM_EXIT_" "MMIO" }`` are handled.
        """
        table: dict[str, int] = {}
        for expr, names in _SYMBOL_ENTRY.findall(self.print_fmt):
            value = sum(int(term, 0) for term in expr.replace(" ", "").split("+"))
            table["".join(_C_STRING.findall(names))] = value
        return table


_FIELD_LINE = re.compile(
    r"^\s*field:(?P<decl>[^;]+);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);\s*signed:(?P<signed>\d+);", re.M
)
_SYMBOL_ENTRY = re.compile(r'\{\s*(-?(?:0x[0-9a-fA-F]+|\d+)(?:\s*\+\s*\d+)?)\s*,\s*((?:"[^"]*"\s*)+)\}')
_C_STRING = re.compile(r'"([^"]*)"')


def parse_format(text: str) -> EventFormat:
    """Parse the text of a tracefs ``format`` file; raises UsageError when it is not one."""
    name = re.search(r"^name:\s*(\S+)", text, re.M)
    ident = re.search(r"^ID:\s*(\d+)", text, re.M)
    fmt = re.search(r"^print fmt:\s*(.*)$", text, re.M)
    if not (name and ident and fmt):
        raise UsageError("not a tracefs format file (no name/ID/print fmt lines)")
    fields = []
    for m in _FIELD_LINE.finditer(text):
        ctype, _, fname = m["decl"].strip().rpartition(" ")
        fname = fname.lstrip("*")
        fname = fname.split("[")[0]
        fields.append(FormatField(fname, ctype.strip(), int(m["offset"]), int(m["size"]), m["signed"] == "1"))
    return EventFormat(name[1], int(ident[1]), tuple(fields), fmt[1])


def read_format(group: str, event: str, root: Path | None = None) -> EventFormat:
    """The running kernel's format of ``group:event``; raises HostError when the event is absent."""
    path = (root or ensure_mounted()) / "events" / group / event / "format"
    try:
        return parse_format(path.read_text())
    except FileNotFoundError:
        raise HostError(f"tracepoint {group}:{event} does not exist on this kernel ({path} missing)") from None


def available_events(groups: tuple[str, ...] = TRACEFS_GROUPS, root: Path | None = None) -> dict[str, tuple[str, ...]]:
    """The events each group has on this kernel (empty tuple when the group is absent, e.g. kvm not loaded)."""
    events_dir = (root or ensure_mounted()) / "events"
    found = {}
    for group in groups:
        gdir = events_dir / group
        found[group] = tuple(sorted(p.parent.name for p in gdir.glob("*/format"))) if gdir.is_dir() else ()
    return found


def schema_events(groups: tuple[str, ...] = TRACEFS_GROUPS) -> tuple[tuple[str, str], ...]:
    """(group, event) of every catalogue event with a tracefs twin in ``groups``."""
    return tuple((e.group, e.name) for e in EVENTS if e.group in groups and e.tracefs)


# --------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------

_STATS_LOSS_KEYS = ("overrun", "commit overrun", "dropped events")


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise HostError(f"cannot write {value.strip()!r} to {path}: {exc.strerror}") from None


@dataclass
class Capture:
    """A private tracefs instance capturing kvm/kvmmmu events to a text file while the block runs.

    ``events=None`` enables every catalogue event (schema.EVENTS) of ``groups`` that this kernel
    has, not whole groups: the kvm group also holds high-rate events the trace format has no
    columns for (kvm_fpu, kvm_cr, ...).  ``tgid`` limits the kernel's recording to that process's
    threads (``set_event_pid`` with ``event-fork``) and ``table()`` to its rows, so captures made
    while other guests run stay clean.  Events the process causes in other tasks' context (reclaim
    by kswapd) are then not seen.
    """

    groups: tuple[str, ...] = TRACEFS_GROUPS
    events: tuple[str, ...] | None = None
    tgid: int | None = None
    buffer_kb: int = DEFAULT_BUFFER_KB
    text_path: Path | None = None
    name: str = field(default_factory=lambda: f"mmutrace-{os.getpid()}-{time.monotonic_ns()}")

    instance: Path = field(init=False)
    enabled: tuple[tuple[str, str], ...] = field(init=False, default=())
    kernel_lost: dict[int, int] = field(init=False, default_factory=dict)  # per_cpu/cpuN/stats
    start_ns: int = field(init=False, default=0)
    stop_ns: int = field(init=False, default=0)
    _own_text: weakref.finalize | None = field(init=False, default=None)  # deletes a temporary text file
    _reader: threading.Thread | None = field(init=False, default=None)
    _stop: threading.Event = field(init=False, default_factory=threading.Event)
    _reader_error: BaseException | None = field(init=False, default=None)
    _parsed: ParsedText | None = field(init=False, default=None)

    # ---- set-up and tear-down

    def __enter__(self) -> Capture:
        root = ensure_mounted()
        self.instance = root / "instances" / self.name
        self.enabled = self._choose_events(root)
        if self.text_path is None:
            fd, tmp = tempfile.mkstemp(prefix="mmutrace-", suffix=".trace")
            os.close(fd)
            self.text_path = Path(tmp)
            # A temporary text file goes with the Capture object, even if cleanup() is never called.
            self._own_text = weakref.finalize(self, Path(tmp).unlink, missing_ok=True)
        try:
            self.instance.mkdir()
        except OSError as exc:
            self.cleanup()
            raise HostError(f"cannot create tracefs instance {self.instance}: {exc.strerror}") from None
        try:
            self._configure()
            self.start_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            for group, event in self.enabled:
                _write(self.instance / "events" / group / event / "enable", "1")
            self._reader = threading.Thread(target=self._pump, name=f"tracefs-{self.name}", daemon=True)
            self._reader.start()
        except BaseException:
            self._teardown()
            self.cleanup()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.stop()
        finally:
            self._teardown()

    def _choose_events(self, root: Path) -> tuple[tuple[str, str], ...]:
        present = available_events(self.groups, root)
        wanted = schema_events(self.groups)
        if self.events is not None:
            by_name = {ev: grp for grp, ev in wanted}
            unknown = [ev for ev in self.events if ev not in by_name]
            if unknown:
                raise UsageError(f"not a tracefs event of the trace format: {', '.join(unknown)}")
            wanted = tuple((by_name[ev], ev) for ev in self.events)
        chosen = tuple((grp, ev) for grp, ev in wanted if ev in present.get(grp, ()))
        if not chosen:
            raise HostError(f"none of the requested events exist under {root}/events (is the kvm module loaded?)")
        return chosen

    def _configure(self) -> None:
        inst = self.instance
        _write(inst / "trace_clock", TRACE_CLOCK)
        _write(inst / "buffer_size_kb", str(self.buffer_kb))
        _write(inst / "options" / "record-tgid", "1")
        if (inst / "options" / "hash-ptr").exists() and not os.uname().release.startswith("6.1."):
            # %p fields (sptep of fast_page_fault/mark_mmio_spte) print the real address, so they
            # identify the same SPTE as the bcc recorder's sptep.  Not on 6.1: there hash-ptr=0
            # prints kvm_mmu_get_page/set_spte/prepare_zap and kvm_exit's reason as empty text
            # (seen in the nested lab, Debian 6.1.0-56; `mmutrace lab`).
            _write(inst / "options" / "hash-ptr", "0")
        if self.tgid is not None:
            tids = [p.name for p in Path(f"/proc/{self.tgid}/task").glob("*")] or [str(self.tgid)]
            _write(inst / "options" / "event-fork", "1")
            _write(inst / "set_event_pid", " ".join(tids))

    def _teardown(self) -> None:
        """Disable the events and remove the instance; every step is tried even if one fails."""
        if not self.instance.is_dir():
            return
        for group, event in self.enabled:
            try:
                (self.instance / "events" / group / event / "enable").write_text("0")
            except OSError:
                pass
        for _ in range(50):  # rmdir fails with EBUSY while a reader still holds trace_pipe open
            try:
                self.instance.rmdir()
                return
            except OSError:
                time.sleep(0.02)
        raise HostError(f"cannot remove tracefs instance {self.instance}; remove it with rmdir")

    # ---- streaming

    def _pump(self) -> None:
        """Copy trace_pipe to text_path until stopped and the buffer is empty."""
        try:
            fd = os.open(self.instance / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
            try:
                with open(self.text_path, "wb") as out:
                    poller = select.poll()
                    poller.register(fd, select.POLLIN)
                    while True:
                        stopping = self._stop.is_set()
                        try:
                            chunk = os.read(fd, 1 << 20)
                        except BlockingIOError:
                            chunk = None
                        if chunk:
                            out.write(chunk)
                            continue
                        if stopping:
                            return
                        poller.poll(50)
            finally:
                os.close(fd)
        except BaseException as exc:  # noqa: BLE001 - re-raised in stop()
            self._reader_error = exc

    def stop(self) -> None:
        """Stop recording, drain what the kernel still holds, and read the per-CPU loss counters."""
        if self._reader is None:
            return
        _write(self.instance / "tracing_on", "0")
        self.stop_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        self._stop.set()
        self._reader.join()
        self._reader = None
        self.kernel_lost = self._read_loss()
        if self._reader_error is not None:
            raise HostError(f"reading {self.instance}/trace_pipe failed: {self._reader_error}")

    def _read_loss(self) -> dict[int, int]:
        lost = {}
        for stats in sorted(self.instance.glob("per_cpu/cpu*/stats")):
            cpu = int(stats.parent.name[3:])
            values = dict(line.split(":", 1) for line in stats.read_text().splitlines() if ":" in line)
            lost[cpu] = sum(int(values[k]) for k in _STATS_LOSS_KEYS if k in values)
        return lost

    # ---- results

    @property
    def marker_path(self) -> Path:
        """The instance's trace_marker: phase markers written here land in this capture only."""
        return self.instance / "trace_marker"

    def parsed(self) -> ParsedText:
        """The captured text, parsed once (after the block has ended)."""
        if self._reader is not None:
            raise UsageError("a Capture's results are available after its with-block ends")
        if self._parsed is None:
            from mmutrace import ftrace_text

            # With tgid, the kernel recorded only that process's tasks: a line whose tgid it did
            # not save (a thread that exited early) is still the process's.
            self._parsed = ftrace_text.parse_file(self.text_path, tgid=self.tgid, unknown_tgid=self.tgid)
        return self._parsed

    def table(self) -> pa.Table:
        """The captured events in schema.ARROW_SCHEMA, sorted by (ts_ns, cpu, seq)."""
        return self.parsed().table

    def markers(self) -> list[tuple[int, str]]:
        """(ts_ns, text) of every trace_marker write, in time order."""
        return self.parsed().markers

    @property
    def lost_by_cpu(self) -> dict[int, int]:
        """Events the kernel dropped per CPU: the larger of its counters (overrun, commit overrun,
        dropped events) and the text's ``CPU:N [LOST M EVENTS]`` lines, so loss is never under-reported."""
        text_lost = self.parsed().lost_by_cpu
        cpus = sorted(set(self.kernel_lost) | set(text_lost))
        return {c: max(self.kernel_lost.get(c, 0), text_lost.get(c, 0)) for c in cpus}

    @property
    def lost(self) -> int:
        return sum(self.lost_by_cpu.values())

    def cleanup(self) -> None:
        """Delete the text file now when the Capture made it (a temporary file)."""
        if self._own_text is not None:
            self._own_text()
