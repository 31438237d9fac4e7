"""Phase markers: one timestamped line per scenario phase, kept in Python and written to tracefs.

Timestamps come from CLOCK_MONOTONIC, the clock ``bpf_ktime_get_ns()`` and tracefs' ``mono``
trace_clock use, so a marker lines up with recorded events without any conversion.  Writing the
same text to ``trace_marker`` puts it in the ftrace stream too (``print`` events), where tracefs
captures and ``mmutrace import`` see it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mmutrace.tracefs import TRACEFS


def default_sinks() -> list[Path]:
    """The top-level trace_marker when tracefs is mounted and writable, else nothing."""
    marker = TRACEFS / "trace_marker"
    return [marker] if marker.exists() and os.access(marker, os.W_OK) else []


class Markers:
    """Collects ``(monotonic ns, text)`` pairs in ``log`` and writes each text to every sink.

    ``cpu_ns`` holds the emitting thread's CPU time at each marker: a scenario's vCPU runs on that
    thread, so the difference between two markers is what the guest cost the host CPU in between,
    whatever else the machine runs (mmutrace bench record).
    """

    def __init__(self, sinks: list[Path | str] | None = None) -> None:
        self.sinks = [Path(p) for p in (default_sinks() if sinks is None else sinks)]
        self.log: list[tuple[int, str]] = []
        self.cpu_ns: list[int] = []

    def emit(self, text: str) -> None:
        self.log.append((time.clock_gettime_ns(time.CLOCK_MONOTONIC), text))
        self.cpu_ns.append(time.thread_time_ns())
        data = text.encode()
        for sink in self.sinks:
            fd = os.open(sink, os.O_WRONLY | os.O_APPEND)  # one record per write; appends to plain files
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
