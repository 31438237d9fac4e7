"""`mmutrace record`: capture a KVM process's MMU events into one Parquet trace.

Two backends write the same file: ``bcc`` (probes/: raw tracepoints with the fault, shadow-page and
memslot inputs, drained in bulk from a BPF ring buffer) and ``tracefs`` (a private tracefs instance,
text parsed by mmutrace.ftrace_text; the printed fields only).  Everything that can fail is checked
before the first event is recorded, so a bad invocation leaves no file behind; once recording
started, Ctrl-C, SIGTERM or the traced command crashing all end in a finalized, valid file.
"""

from __future__ import annotations

import enum
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmutrace import hostinfo, schema, storage, tracefs
from mmutrace.errors import HostError, UsageError

#: How long the recorder sleeps when the ring is empty: at 1.5M events/s that is ~2 MiB of records,
#: far below the ring's 128 MiB, and it keeps wake-ups off the probes' hot path.
POLL_INTERVAL_S = 0.01
#: stop_reason when the traced command ended by itself (its exit status then matters).
COMMAND_EXITED = "command exited"


class Backend(str, enum.Enum):
    BCC = "bcc"
    TRACEFS = "tracefs"


@dataclass(frozen=True)
class ScenarioSpec:
    """A built-in scenario to run in a child process while recording."""

    name: str
    seed: int = 0
    size: int | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "mmutrace.scenarios", "run", self.name, "--seed", str(self.seed), "--json"]
        return cmd + (["--size", str(self.size)] if self.size is not None else [])


@dataclass
class RecordOptions:
    """What to record (at most one of pid / command / scenario; none = every process) and where."""

    output: Path
    pid: int | None = None
    command: list[str] | None = None
    scenario: ScenarioSpec | None = None
    duration: float | None = None
    events: list[str] = field(default_factory=lambda: [e.name for e in schema.EVENTS])
    backend: Backend = Backend.BCC
    force: bool = False


@dataclass
class RecordResult:
    """What a recording wrote and what it knows it missed."""

    path: Path
    events: int
    lost: int
    hits: dict[str, int]
    stop_reason: str
    child_status: int | None
    scenario: dict[str, Any] | None
    cpu_s: float  # the recorder's, its converter's included
    metadata: dict[str, Any]
    convert_cpu_s: float = 0.0  # bcc: the converter child's share of cpu_s


# --------------------------------------------------------------------------------------------
# Checks before anything starts
# --------------------------------------------------------------------------------------------


def parse_events(spec: str | None) -> list[str]:
    """``a,b,c`` as catalogue event names; UsageError naming close matches for an unknown one."""
    if not spec:
        return [e.name for e in schema.EVENTS]
    names = [name.strip() for name in spec.split(",") if name.strip()]
    for name in names:
        try:
            schema.event_kind(name)
        except KeyError as exc:
            raise UsageError(exc.args[0]) from None
    return list(dict.fromkeys(names))


def is_kvm_process(pid: int) -> bool:
    """Whether ``pid`` holds /dev/kvm or a KVM VM/vCPU file open."""
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except FileNotFoundError:
        raise UsageError(f"no process with pid {pid}") from None
    except PermissionError:
        raise HostError(f"cannot read /proc/{pid}/fd (recording needs root)") from None
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target == "/dev/kvm" or target.startswith("anon_inode:kvm-"):
            return True
    return False


def preflight(opts: RecordOptions) -> None:
    """Everything recording needs, checked before any probe, file or child exists."""
    if sum(x is not None for x in (opts.pid, opts.command, opts.scenario)) > 1:
        raise UsageError("give at most one target: -p PID, --scenario NAME or -- COMMAND")
    if opts.duration is not None and opts.duration <= 0:
        raise UsageError(f"--duration must be positive, got {opts.duration}")
    if os.geteuid() != 0:
        raise HostError("recording needs root (BPF programs and tracefs)")
    tracefs.ensure_mounted()
    if opts.scenario is not None:
        from mmutrace.scenarios import get_scenario

        get_scenario(opts.scenario.name).check_size(opts.scenario.size or get_scenario(opts.scenario.name).default_size)
    if opts.command and shutil.which(opts.command[0]) is None:
        raise UsageError(f"command not found: {opts.command[0]}")
    if opts.pid is not None and not is_kvm_process(opts.pid):
        raise UsageError(f"process {opts.pid} is not a KVM process (it has no /dev/kvm or kvm-vm file open)")
    if opts.backend is Backend.BCC:
        try:
            import bcc  # noqa: F401
        except ImportError:
            raise HostError("bcc is not importable (Debian python3-bpfcc; run ./run.sh setup)") from None
        from probes.loader import kernel_source

        kernel_source()
    storage.check_output(opts.output, opts.force)


# --------------------------------------------------------------------------------------------
# The traced child
# --------------------------------------------------------------------------------------------

#: Runs in the child: wait for the recorder to say go, then become the command (same pid).
_GATE = "import os, sys; fd = int(sys.argv[1]); os.read(fd, 1); os.close(fd); os.execvp(sys.argv[2], sys.argv[2:])"


class Child:
    """A command started held at a gate, so its pid can be targeted before it runs any KVM code.

    It runs in its own session: the recorder decides when it ends (Ctrl-C stops the recording,
    which then ends the command and everything it started, by process group).
    """

    def __init__(self, command: list[str], capture_stdout: bool) -> None:
        self._gate_r, self._gate_w = os.pipe()
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _GATE, str(self._gate_r), *command],
                                         pass_fds=(self._gate_r,), start_new_session=True,
                                         stdout=subprocess.PIPE if capture_stdout else None)
        except OSError as exc:
            raise UsageError(f"cannot start {command[0]}: {exc.strerror}") from None
        finally:
            os.close(self._gate_r)
        self.pid = self.proc.pid
        self.stdout = b""

    def release(self) -> None:
        os.write(self._gate_w, b"g")
        os.close(self._gate_w)

    def finished(self) -> bool:
        return self.proc.poll() is not None

    def finish(self, terminate: bool = True) -> int:
        """Wait for the child and collect its output; ``terminate`` ends it first if it still runs
        (the recording stopped before the command did)."""
        if terminate and self.proc.poll() is None:
            os.killpg(self.pid, signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=10 if terminate else None)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            out, _ = self.proc.communicate()
        self.stdout = out or b""
        return self.proc.returncode


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM stops a recording like Ctrl-C: KeyboardInterrupt in the main thread."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------


class _Stop:
    """When a recording ends: the child exits, the pid disappears, or the duration passes."""

    def __init__(self, opts: RecordOptions, child: Child | None, start: float) -> None:
        self._deadline = start + opts.duration if opts.duration else None
        self._child, self._pid = child, opts.pid

    def __call__(self) -> str | None:
        if self._child is not None and self._child.finished():
            return COMMAND_EXITED
        if self._pid is not None and not Path(f"/proc/{self._pid}").exists():
            return "process exited"
        if self._deadline is not None and time.monotonic() >= self._deadline:
            return "duration"
        return None


def _base_metadata(opts: RecordOptions) -> dict[str, Any]:
    meta: dict[str, Any] = {
        **hostinfo.host_metadata(),
        "recorder": opts.backend.value,
        "origin": "host",
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "start_ns": time.clock_gettime_ns(time.CLOCK_MONOTONIC),
    }
    if opts.command:
        meta["command"] = list(opts.command)
    if opts.scenario:
        meta["scenario"] = {"name": opts.scenario.name, "seed": opts.scenario.seed, "size": opts.scenario.size}
    if opts.pid is not None:
        meta["pid"] = opts.pid
    return meta


def _child_metadata(opts: RecordOptions, child: Child | None, status: int | None) -> dict[str, Any]:
    """The scenario's own report (size, markers) from its --json output; the command's status."""
    if child is None:
        return {}
    meta: dict[str, Any] = {"child_status": status}
    if opts.scenario and child.stdout.strip():
        try:
            report = json.loads(child.stdout.decode().strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            return meta
        meta["scenario"] = {k: v for k, v in report.items() if k != "markers"}
        meta["markers"] = [{"ts_ns": int(ts), "text": text} for ts, text in report.get("markers", [])]
    return meta


class Status:
    """A one-line rich status (events/s, lost, file size) on a terminal; nothing otherwise."""

    def __init__(self, enabled: bool) -> None:
        self._status = None
        self._last = (time.monotonic(), 0)
        if enabled:
            from rich.console import Console

            self._status = Console(stderr=True).status("recording…")
            self._status.start()

    def update(self, progress: Callable[[], tuple[int, int, int]]) -> None:
        """Refresh at most twice a second from ``progress()``: (events, lost, bytes written)."""
        now = time.monotonic()
        if self._status is None or now - self._last[0] < 0.5:
            return
        events, lost, size = progress()
        rate = (events - self._last[1]) / (now - self._last[0])
        self._last = (now, events)
        self._status.update(f"recording: {events:,} events, {rate:,.0f}/s, lost {lost:,}, {size / 1e6:.1f} MB")

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()


def record(opts: RecordOptions, status: bool = False) -> RecordResult:
    """Record ``opts``'s target into ``opts.output``; see the module docstring."""
    preflight(opts)
    command = opts.scenario.command() if opts.scenario else opts.command
    if opts.backend is Backend.TRACEFS:
        return _record_tracefs(opts, command, status)
    return _record_bcc(opts, command, status)


def _run(opts: RecordOptions, child: Child | None, step: Callable[[], None],
         progress: Callable[[], tuple[int, int, int]], status: bool) -> tuple[str, int | None]:
    """Let the child go, then call ``step`` until the target stops, the duration passes or the user
    interrupts (Ctrl-C, SIGTERM); returns why it stopped and the child's exit status."""
    stop_reason, child_status, display = "interrupted", None, Status(status)
    try:
        if child is not None:
            child.release()
        stop = _Stop(opts, child, time.monotonic())
        while (reason := stop()) is None:
            step()
            display.update(progress)
        stop_reason = reason
    except KeyboardInterrupt:
        pass
    finally:
        display.stop()
        if child is not None:
            child_status = child.finish()
    return stop_reason, child_status


def _record_bcc(opts: RecordOptions, command: list[str] | None, status: bool) -> RecordResult:
    """The ring is spooled raw while the target runs; a nice-19 converter child decodes and writes
    the Parquet file (mmutrace.spool), so the recorder itself keeps up with a vCPU at full speed."""
    from mmutrace.ringbuf import Rings
    from mmutrace.spool import Spool
    from probes.loader import RINGBUF_PAGES, MmuProbes

    targeted = opts.pid is not None or command is not None
    probes = MmuProbes(opts.events, [opts.pid] if opts.pid is not None else ([] if targeted else None))
    rings = Rings(probes.ring_fds, RINGBUF_PAGES * os.sysconf("SC_PAGE_SIZE"))
    cpu0 = time.process_time()
    meta = _base_metadata(opts)
    meta["probes"] = probes.probes
    meta["event_inputs"] = {e: list(schema.event_kind(e).inputs) for e in opts.events}
    child = None
    try:
        with stop_on_sigterm(), Spool(opts.output, meta, force=opts.force, lost=probes.lost) as spool:

            def step() -> None:
                if not spool.take(rings):
                    time.sleep(POLL_INTERVAL_S)

            if command is not None:
                child = Child(command, capture_stdout=opts.scenario is not None)
                probes.add_target(child.pid)
            stop_reason, child_status = _run(
                opts, child, step, lambda: (spool.records, sum(probes.lost().values()), spool.bytes), status)
            # The target is gone or stopped: everything it emitted is committed; take the rest.
            while spool.take(rings):
                pass
            hits = probes.hits()
            events, result_meta = spool.finish(
                stop_ns=time.clock_gettime_ns(time.CLOCK_MONOTONIC), stop_reason=stop_reason,
                lost=probes.lost(), event_hits=hits, **_child_metadata(opts, child, child_status))
    finally:
        if child is not None and child.proc.returncode is None:
            child.finish()
        rings.close()
        probes.close()
    return RecordResult(opts.output, events, result_meta["lost_total"], hits, stop_reason, child_status,
                        result_meta.get("scenario"), time.process_time() - cpu0 + spool.convert_cpu_s,
                        result_meta, convert_cpu_s=spool.convert_cpu_s)


def _record_tracefs(opts: RecordOptions, command: list[str] | None, status: bool) -> RecordResult:
    wanted = tuple(e for e in opts.events if schema.event_kind(e).group in schema.TRACEFS_GROUPS)
    if not wanted:
        raise UsageError("none of the requested events exists in tracefs (ioctl_* events need --backend bcc)")
    cpu0 = time.process_time()
    child = Child(command, capture_stdout=opts.scenario is not None) if command is not None else None
    meta = _base_metadata(opts)
    meta["event_inputs"] = {e: [] for e in wanted}
    capture = tracefs.Capture(events=wanted, tgid=child.pid if child is not None else opts.pid)
    try:
        with stop_on_sigterm():
            with capture:
                stop_reason, child_status = _run(
                    opts, child, lambda: time.sleep(0.1), lambda: (0, 0, capture.text_path.stat().st_size), status)
            meta["probes"] = [f"tracepoint:{g}:{e}" for g, e in capture.enabled]
            with storage.TraceWriter(opts.output, meta, force=opts.force) as writer:
                writer.write_batch(capture.table())
                writer.update_metadata(stop_ns=capture.stop_ns, stop_reason=stop_reason,
                                       lost={str(c): n for c, n in capture.lost_by_cpu.items()},
                                       **_child_metadata(opts, child, child_status))
                result_meta, events = writer.metadata, writer.events_written
    finally:
        if child is not None and child.proc.returncode is None:
            child.finish()
        capture.cleanup()
    return RecordResult(opts.output, events, result_meta["lost_total"], {}, stop_reason, child_status,
                        result_meta.get("scenario"), time.process_time() - cpu0, result_meta)
