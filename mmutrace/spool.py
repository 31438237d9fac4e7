"""The bcc recorder's hot path: raw ring records into spool files, decoded and written off that path.

Decoding, sorting and Parquet-encoding an event costs ~1.7 µs of CPU; one vCPU faulting at full
speed makes ~1.5M events/s, and on a small machine a recorder doing that work next to the guest
takes CPU from the vCPU.  So the recording process only copies the committed ring records (their
``bpf_ringbuf_hdr`` included) into chunk files of the recording's hidden partial directory (a
chunk is one file per ring, ``spool-NNNNNN.<ring>.bin``, with ``spool.json`` describing the record
layouts beside them) and advances ``consumer_pos``: one ``write`` per ring and poll, at memcpy
speed.  A converter child (``python -m mmutrace.spool``), at nice 19 so the vCPU keeps its core,
owns the storage.TraceWriter: it decodes
each chunk the recorder hands over, writes its rows (segments, as before) and deletes the chunk, and
finalizes the file once the recorder says the recording ended.

Crash safety: Ctrl-C and SIGTERM reach the recorder only (the converter runs in its own session and
ignores them); the recorder drains the ring, hands over the last chunk and waits for the converter
to finalize the file.  A SIGKILLed recorder takes the converter with it (``PR_SET_PDEATHSIG``): the
segments written so far and the chunks not yet converted are what ``mmutrace repair`` recovers
(``repair`` below); only rows the converter held in memory are lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from mmutrace import schema, storage
from mmutrace.errors import HostError
from mmutrace.ringbuf import RING_DTYPES, Rings, decode, kept_records

#: A chunk is handed to the converter when it holds this many records (one row group) ...
CHUNK_RECORDS = 1 << 18
#: ... or is this old, so segments (what a SIGKILL keeps) follow the recording closely.
CHUNK_SECONDS = 0.5
#: Closed chunks are handed over while the events come slower than QUIET_RATE a second (measured
#: over RATE_WINDOW_S), or once MAX_BACKLOG_RECORDS wait (256 MiB): while a guest faults at speed
#: a converter running next to it slows it even at nice 19 (docs/benchmarks.md), so conversion
#: waits for a quiet moment, up to that much.
QUIET_RATE = 50_000
RATE_WINDOW_S = 0.1
MAX_BACKLOG_RECORDS = 1 << 21
LAYOUT_NAME = "spool.json"
#: The per-CPU loss counters as of the last closed chunk: what a repaired recording reports as lost.
LOST_NAME = "lost.json"
_PR_SET_PDEATHSIG = 1


def spool_layout(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """What ``spool.json`` says: the chunks' record layout, and the recording's metadata so that
    ``repair`` can turn chunks into a trace even when the converter never wrote a segment."""
    return {"chunks": "spool-NNNNNN.<ring>.bin",
            "rings": {name: {"record_size": dtype.itemsize, "dtype": dtype.descr}
                      for name, dtype in RING_DTYPES.items()},
            "header": "struct bpf_ringbuf_hdr: len (bit 31 busy, bit 30 discard), pg_off",
            "events": [e.name for e in schema.EVENTS], "metadata": dict(metadata)}


def chunk_path(partial: Path, chunk: str, ring: str) -> Path:
    """The file of ``ring``'s records in chunk ``chunk`` (``spool-NNNNNN``)."""
    return partial / f"{chunk}.{ring}.bin"


def chunk_records(path: Path) -> np.ndarray:
    """The kept records of one chunk file (its ring's record dtype): whole records only (a killed
    recorder's last chunk may end mid-record), DISCARDed ones left out."""
    dtype = RING_DTYPES[path.name.split(".")[1]]
    raw = np.fromfile(path, np.uint8)
    return kept_records(raw[: len(raw) - len(raw) % dtype.itemsize].view(dtype))


def repair(path: str | os.PathLike[str]) -> Path:
    """``storage.repair`` for a recording whose recorder was killed with chunks still spooled.

    Each leftover chunk (its whole records; the one being written may end mid-record) becomes one
    more segment, minus rows a segment already holds (the converter may have been mid-chunk), so a
    SIGKILL loses only what the converter held in memory, not the spool.
    """
    given = Path(path)
    partial = given if given.is_dir() else storage.partial_dir(given)
    chunks = sorted(partial.glob("spool-*.bin")) if partial.is_dir() else []
    if chunks:
        metadata = json.loads((partial / LAYOUT_NAME).read_text())["metadata"]
        flushed = _flushed_keys(partial)
        for chunk in chunks:
            records = chunk_records(chunk)
            keys = _row_keys(records["cpu"], records["seq"])
            storage.append_segment(partial, decode([records[~np.isin(keys, flushed)]]), metadata, CHUNK_RECORDS)
            chunk.unlink()
    lost_file = partial / LOST_NAME
    if not lost_file.exists():
        return storage.repair(given)
    lost = json.loads(lost_file.read_text())
    return storage.repair(given, {"lost": lost, "lost_total": sum(lost.values())},
                          "loss counted up to the last spooled chunk")


def _row_keys(cpu: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """cpu << 32 | seq: a recording's unique row key (seq counts per CPU)."""
    return cpu.astype(np.uint64) << np.uint64(32) | seq.astype(np.uint64)


def _flushed_keys(partial: Path) -> np.ndarray:
    """The row key of every row already in a segment."""
    keys = [np.zeros(0, np.uint64)]
    for segment in partial.glob("seg-*.parquet"):
        table = pq.read_table(segment, columns=["cpu", "seq"])
        keys.append(_row_keys(table["cpu"].to_numpy(), table["seq"].to_numpy()))
    return np.concatenate(keys)


@contextlib.contextmanager
def _stop_signals_ignored() -> Iterator[None]:
    """While the recorder waits for the converter, Ctrl-C/SIGTERM must not abandon it half-way."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Spool:
    """Spools ring buffers into chunk files that a converter child turns into the trace ``output``.

    A context manager that ends the recording however the block ends, with TraceWriter's rule:
    normally or by KeyboardInterrupt/SystemExit the file is ``complete``, otherwise it is not.
    """

    def __init__(self, output: Path, metadata: Mapping[str, Any], force: bool,
                 lost: Callable[[], Mapping[str, int]]) -> None:
        self.partial = storage.partial_dir(output)
        self._lost = lost  # the probes' per-CPU loss counters, saved with every chunk for repair
        self.records = 0  # spooled so far
        self.bytes = 0  # their ring records' bytes
        self.convert_cpu_s = 0.0
        self._fds: dict[str, int] = {}  # the current chunk's file per ring, while one is open
        self._ready: list[str] = []  # closed chunks not yet handed to the converter
        self._quiet = True  # the spool rate was below QUIET_RATE in the last RATE_WINDOW_S
        self._window_start, self._window_records = time.monotonic(), 0
        self._chunks = self._chunk_records = 0
        self._opened = 0.0
        self._done = False
        self._proc = subprocess.Popen([sys.executable, "-m", "mmutrace.spool", str(os.getpid())],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      start_new_session=True)
        with _stop_signals_ignored():
            self._send({"output": str(output), "metadata": metadata, "force": force})
            assert self._proc.stdout is not None
            if self._proc.stdout.readline().strip() != "ready":
                self._done = True
                raise HostError(f"the spool converter did not start (status {self._proc.wait()})")
        (self.partial / LAYOUT_NAME).write_text(json.dumps(spool_layout(metadata)))

    def _send(self, message: Mapping[str, Any]) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps(message) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            self._done = True
            raise HostError(f"the spool converter died (status {self._proc.wait()}); what it wrote is in "
                            f"{self.partial}: run 'mmutrace repair'") from None

    def take(self, rings: Rings) -> int:
        """Spool the rings' committed records; returns how many (0: the rings were empty)."""
        if not self._fds:
            self._fds = {ring: os.open(chunk_path(self.partial, self._chunk_name(), ring),
                                       os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600) for ring in rings.rings}
            self._opened = time.monotonic()
        n = 0
        for name, ring in rings.rings.items():
            taken = ring.drain_to(self._fds[name], CHUNK_RECORDS - self._chunk_records - n)
            self.bytes += taken * ring.dtype.itemsize
            n += taken
        self._chunk_records += n
        self.records += n
        if self._chunk_records >= CHUNK_RECORDS or (
                self._chunk_records and time.monotonic() - self._opened >= CHUNK_SECONDS):
            self._close_chunk()
        self._measure_rate(n)
        if self._ready and (self._quiet or len(self._ready) * CHUNK_RECORDS >= MAX_BACKLOG_RECORDS):
            self._hand_over()
        return n

    def _measure_rate(self, n: int) -> None:
        """Count ``n`` records into the rate window; at its end, decide whether the guest is quiet."""
        now = time.monotonic()
        self._window_records += n
        if now - self._window_start >= RATE_WINDOW_S:
            self._quiet = self._window_records < QUIET_RATE * (now - self._window_start)
            self._window_start, self._window_records = now, 0

    def _chunk_name(self) -> str:
        return f"spool-{self._chunks:06d}"

    def _close_chunk(self) -> None:
        """Close the current chunk and queue it for the converter."""
        for fd in self._fds.values():
            os.close(fd)
        lost = self.partial / LOST_NAME
        lost.with_suffix(".tmp").write_text(json.dumps(dict(self._lost())))
        lost.with_suffix(".tmp").replace(lost)
        self._ready.append(self._chunk_name())
        self._fds, self._chunks, self._chunk_records = {}, self._chunks + 1, 0

    def _hand_over(self) -> None:
        """Give the queued chunks to the converter."""
        for name in self._ready:
            self._send({"chunk": name})
        self._ready.clear()

    def finish(self, complete: bool = True, **metadata: Any) -> tuple[int, dict[str, Any]]:
        """End the recording: the converter converts every chunk, merges ``metadata`` and finalizes
        the file.  Returns the events written and the file's metadata."""
        self._done = True
        with _stop_signals_ignored():
            if self._chunk_records:
                self._close_chunk()
            for ring, fd in self._fds.items():  # an empty chunk
                os.close(fd)
                chunk_path(self.partial, self._chunk_name(), ring).unlink()
            self._hand_over()
            self._send({"end": metadata, "complete": complete})
            assert self._proc.stdin is not None and self._proc.stdout is not None
            self._proc.stdin.close()
            out = self._proc.stdout.read()
            _, status, usage = os.wait4(self._proc.pid, 0)
            self._proc.returncode = os.waitstatus_to_exitcode(status)
        self.convert_cpu_s = usage.ru_utime + usage.ru_stime
        if self._proc.returncode != 0:
            raise HostError(f"the spool converter failed (status {self._proc.returncode}); what it wrote "
                            f"is in {self.partial}: run 'mmutrace repair'")
        result = json.loads(out)
        return result["events"], result["metadata"]

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._done:
            return
        stopped = exc_type is None or issubclass(exc_type, (KeyboardInterrupt, SystemExit))
        self.finish(complete=stopped, **({"stop_reason": exc_type.__name__} if exc_type is not None else {}))


def _in_time_order(chunk: list[np.ndarray], held: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per ring, the rows to write now and the rows to hold for the next chunk.

    The recorder drains one ring after the other, so a chunk's later ring holds records younger
    than some the earlier ring's next chunk brings.  Writing only rows no newer than the newest
    row of every ring that got new rows keeps the writer's batches in time order: it then only
    checks the order, instead of sorting (a take of every column) what it holds.
    """
    newest = [int(rows["ts_ns"].max()) for rows in chunk if len(rows)]
    cut = min(newest) if newest else -1
    merged = [np.concatenate([old, new]) for old, new in zip(held, chunk)]
    return [rows[rows["ts_ns"] <= cut] for rows in merged], [rows[rows["ts_ns"] > cut] for rows in merged]


def _convert(recorder: int) -> int:
    """The converter child: chunks named on stdin into the TraceWriter, until ``end`` (see above)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != recorder:  # it died before prctl
        return 1
    os.nice(19)
    start = json.loads(sys.stdin.readline())
    writer = storage.TraceWriter(start["output"], start["metadata"], force=start["force"])
    print("ready", flush=True)
    held = [np.zeros(0, dtype["rec"]) for dtype in RING_DTYPES.values()]
    for line in sys.stdin:
        message = json.loads(line)
        if "chunk" in message:
            partial = storage.partial_dir(writer.path)
            paths = [chunk_path(partial, message["chunk"], ring) for ring in RING_DTYPES]
            ready, held = _in_time_order([chunk_records(path) for path in paths], held)
            writer.write_batch(decode(ready))
            for path in paths:
                path.unlink()
            continue
        writer.write_batch(decode(held))
        writer.update_metadata(**message["end"])
        writer.close(complete=message["complete"])
        print(json.dumps({"events": writer.events_written, "metadata": writer.metadata}), flush=True)
        return 0
    return 1  # the recorder ended without ending the recording: the segments stay for repair


if __name__ == "__main__":
    sys.exit(_convert(int(sys.argv[1])))
