"""Bulk consumer of the probes' BPF ring buffers, and the decoder of their records into schema columns.

No per-event Python: each ring buffer map (probes.layout.RINGS: full records and small ones) is
mmapped (kernel/bpf/ringbuf.c layout: the consumer page at offset 0, read-write; the producer page
and then the data pages, mapped twice so a record never wraps, at offset PAGE_SIZE, read-only),
every committed record between ``consumer_pos`` and ``producer_pos`` is copied out at once, and
``consumer_pos`` is advanced past them: as one numpy structured array (``drain``), or, on the
recorder's hot path, written raw to a spool file with one ``write`` (``drain_to``; mmutrace.spool
decodes it off the hot path).  ``decode`` then builds each schema column for the whole batch at
once from the per-event slot table in probes/layout.py.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from mmutrace import schema
from probes.layout import RINGS, SLOTS

PAGE_SIZE = mmap.PAGESIZE
#: bpf_ringbuf_hdr.len flags (include/uapi/linux/bpf.h).
BPF_RINGBUF_BUSY_BIT = 1 << 31
BPF_RINGBUF_DISCARD_BIT = 1 << 30
BPF_RINGBUF_HDR_SZ = 8



def ring_dtype(record: np.dtype) -> np.dtype:
    """A ring record: ``struct bpf_ringbuf_hdr`` then the ``struct mmu_record``.  All records of one
    ring have this size (8-byte aligned), so the records between two positions sit at a fixed stride."""
    dtype = np.dtype([("len", "<u4"), ("pgoff", "<u4"), ("rec", record)])
    assert dtype.itemsize % 8 == 0
    return dtype


#: The ring records of each ring (probes.layout.RINGS), by map name.
RING_DTYPES = {name: ring_dtype(record) for name, record in RINGS.items()}


def kept_records(ring: np.ndarray) -> np.ndarray:
    """The ``struct mmu_record``s of committed ring records, DISCARDed ones left out."""
    return ring["rec"][(ring["len"] & BPF_RINGBUF_DISCARD_BIT) == 0]


class RingBuffer:
    """The mmapped ring buffer of map ``fd`` holding ``data_size`` bytes of ``dtype`` ring records."""

    def __init__(self, fd: int, data_size: int, dtype: np.dtype) -> None:
        if data_size % dtype.itemsize:
            raise ValueError(f"ring size {data_size} is not a multiple of the record size {dtype.itemsize}")
        self.dtype = dtype
        self.data_size = data_size
        self._consumer_map = mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer_map = mmap.mmap(fd, PAGE_SIZE + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ,
                                       offset=PAGE_SIZE)
        self._consumer_pos = np.frombuffer(self._consumer_map, np.uint64, 1)
        self._producer_pos = np.frombuffer(self._producer_map, np.uint64, 1)
        self._data = np.frombuffer(self._producer_map, np.uint8, 2 * data_size, offset=PAGE_SIZE)

    def pending_bytes(self) -> int:
        return int(self._producer_pos[0]) - int(self._consumer_pos[0])

    def _committed(self, max_records: int) -> tuple[int, np.ndarray]:
        """``consumer_pos`` and the committed ring records after it (a view into the ring).

        Stops at the first record still being written (BUSY): records commit out of order across
        CPUs, and the consumer must not pass one that is not done.
        """
        cons = int(self._consumer_pos[0])
        n = min((int(self._producer_pos[0]) - cons) // self.dtype.itemsize, max_records)
        start = cons % self.data_size
        ring = self._data[start: start + max(n, 0) * self.dtype.itemsize].view(self.dtype)
        busy = np.flatnonzero(ring["len"] & BPF_RINGBUF_BUSY_BIT)
        return cons, ring[: busy[0]] if len(busy) else ring

    def _release(self, cons: int, ring: np.ndarray) -> None:
        """Give the space of ``ring`` (the records taken from ``cons`` on) back to the producers."""
        self._consumer_pos[0] = cons + len(ring) * self.dtype.itemsize

    def drain(self, max_records: int = 1 << 20) -> np.ndarray:
        """Copy out up to ``max_records`` committed records (the ring's record dtype) and release
        their space."""
        cons, ring = self._committed(max_records)
        records = kept_records(ring).copy()
        self._release(cons, ring)
        return records

    def drain_to(self, fd: int, max_records: int = 1 << 20) -> int:
        """Write up to ``max_records`` committed ring records, headers included, to the file ``fd``
        and release their space; returns how many.  One ``write`` from the mapped ring, no decoding:
        the recorder's hot path (mmutrace.spool)."""
        cons, ring = self._committed(max_records)
        data = memoryview(ring.view(np.uint8))
        while data:
            data = data[os.write(fd, data):]
        self._release(cons, ring)
        return len(ring)

    def close(self) -> None:
        del self._consumer_pos, self._producer_pos, self._data
        self._consumer_map.close()
        self._producer_map.close()


class Rings:
    """The probes' ring buffers (``fds``: map name -> fd, each ``data_size`` bytes), used together."""

    def __init__(self, fds: dict[str, int], data_size: int) -> None:
        self.rings: dict[str, RingBuffer] = {}
        try:
            for name, fd in fds.items():
                self.rings[name] = RingBuffer(fd, data_size, RING_DTYPES[name])
        except BaseException:
            self.close()
            raise

    def drain(self) -> list[np.ndarray]:
        """Every committed record, one batch per ring (``decode`` takes them as they are)."""
        return [ring.drain() for ring in self.rings.values()]

    def close(self) -> None:
        for ring in self.rings.values():
            ring.close()


# --------------------------------------------------------------------------------------------
# Records -> schema columns
# --------------------------------------------------------------------------------------------

EVENT_NAMES = pa.array([e.name for e in schema.EVENTS], pa.string())
_SLOTS_BY_ID = [SLOTS[e.name] for e in schema.EVENTS]
_NUMPY_TYPES = {f.name: np.dtype(bool) if pa.types.is_boolean(f.type) else np.dtype(f.type.to_pandas_dtype())
                for f in schema.FIELD_COLUMNS}


def decode(batches: Sequence[np.ndarray]) -> dict[str, pa.Array]:
    """Schema columns (name -> Arrow array) for batches of records of any mix of events, one
    batch per ring (each its own record dtype), their rows merged in (ts_ns, cpu, seq) order.

    The merge is done here, on the few header fields, because the writer's own sort (a take of
    every column) costs more when two rings' batches arrive one after the other; in order, it
    only checks.  Works per batch and event kind present in it (a handful), on that kind's rows
    only, so the cost is the number of fields actually recorded, not rows times columns.  Slot
    values are u64: signed fields arrive sign-extended (the C casts them) or as their low bits
    (packed slots), so a truncating cast gives the value either way.
    """
    merged = {name: np.concatenate([b[name] for b in batches])
              for name in ("ts_ns", "cpu", "seq", "pid", "tid", "vm", "vcpu", "event")}
    order = np.lexsort((merged["seq"], merged["cpu"], merged["ts_ns"]))
    header = {name: column[order] for name, column in merged.items()}
    n = len(order)
    position = np.empty(n, np.intp)  # where each merged row goes
    position[order] = np.arange(n)
    vcpu, vm = header["vcpu"], header["vm"]
    columns: dict[str, pa.Array] = {
        "ts_ns": pa.array(header["ts_ns"], pa.uint64()),
        "cpu": pa.array(header["cpu"], pa.uint16()),
        "seq": pa.array(header["seq"], pa.uint32()),
        "pid": pa.array(header["pid"], pa.int32()),
        "tid": pa.array(header["tid"], pa.int32()),
        "vm": pa.array(vm, pa.uint64(), mask=vm == 0),
        "vcpu": pa.array(vcpu, pa.int32(), mask=vcpu < 0),
        "event": pa.DictionaryArray.from_arrays(pa.array(header["event"].astype(np.int16)), EVENT_NAMES),
    }
    values: dict[str, np.ndarray] = {}
    valid: dict[str, np.ndarray] = {}
    start = 0
    for records in batches:
        events = records["event"]
        counts = np.bincount(events, minlength=len(_SLOTS_BY_ID))
        for event_id in np.flatnonzero(counts):
            rows = np.flatnonzero(events == event_id)
            fields, nulls = records["f"][rows], records["nulls"][rows]
            rows = position[rows + start]
            for slot in _SLOTS_BY_ID[event_id]:
                column = slot.column
                if column not in values:
                    values[column] = np.zeros(n, _NUMPY_TYPES[column])
                    valid[column] = np.zeros(n, bool)
                raw = fields[:, slot.index]
                if slot.bits < 64:
                    raw = (raw >> np.uint64(slot.shift)) & np.uint64((1 << slot.bits) - 1)
                values[column][rows] = raw if column not in _SIGNED_COLUMNS else raw.view(np.int64)
                valid[column][rows] = (nulls & (1 << slot.index)) == 0
        start += len(records)
    for column, array in values.items():
        columns[column] = pa.array(array, schema.COLUMN_TYPES[column], mask=~valid[column])
    return columns


_SIGNED_COLUMNS = {name for name, t in schema.COLUMN_TYPES.items() if pa.types.is_signed_integer(t)}
