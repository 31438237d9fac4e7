"""Bulk consumer of the probes' BPF ring buffer, and the decoder of its records into schema columns.

No per-event Python: the ring buffer map is mmapped (kernel/bpf/ringbuf.c layout: the consumer
page at offset 0, read-write; the producer page and then the data pages, mapped twice so a record
never wraps, at offset PAGE_SIZE, read-only), every committed record between ``consumer_pos`` and
``producer_pos`` is copied out as one numpy structured array, and ``consumer_pos`` is advanced past
them.  ``decode`` then builds each schema column for the whole batch at once from the per-event slot
table in probes/layout.py.
"""

from __future__ import annotations

import mmap

import numpy as np
import pyarrow as pa

from mmutrace import schema
from probes.layout import RECORD_DTYPE, SLOTS

PAGE_SIZE = mmap.PAGESIZE
#: bpf_ringbuf_hdr.len flags (include/uapi/linux/bpf.h).
BPF_RINGBUF_BUSY_BIT = 1 << 31
BPF_RINGBUF_DISCARD_BIT = 1 << 30
BPF_RINGBUF_HDR_SZ = 8

#: A ring record: ``struct bpf_ringbuf_hdr`` then ``struct mmu_record``.  All records have this size
#: (8-byte aligned), so the records between two positions sit at a fixed stride.
RING_DTYPE = np.dtype([("len", "<u4"), ("pgoff", "<u4"), ("rec", RECORD_DTYPE)])
assert RING_DTYPE.itemsize % 8 == 0


class RingBuffer:
    """The mmapped ring buffer of map ``fd`` holding ``data_size`` bytes of records."""

    def __init__(self, fd: int, data_size: int) -> None:
        if data_size % RING_DTYPE.itemsize:
            raise ValueError(f"ring size {data_size} is not a multiple of the record size {RING_DTYPE.itemsize}")
        self.data_size = data_size
        self._consumer_map = mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer_map = mmap.mmap(fd, PAGE_SIZE + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ,
                                       offset=PAGE_SIZE)
        self._consumer_pos = np.frombuffer(self._consumer_map, np.uint64, 1)
        self._producer_pos = np.frombuffer(self._producer_map, np.uint64, 1)
        self._data = np.frombuffer(self._producer_map, np.uint8, 2 * data_size, offset=PAGE_SIZE)

    def pending_bytes(self) -> int:
        return int(self._producer_pos[0]) - int(self._consumer_pos[0])

    def drain(self, max_records: int = 1 << 20) -> np.ndarray:
        """Copy out up to ``max_records`` committed records (RECORD_DTYPE) and release their space.

        Stops at the first record still being written (BUSY): records commit out of order across
        CPUs, and the consumer must not pass one that is not done.
        """
        cons = int(self._consumer_pos[0])
        avail = (int(self._producer_pos[0]) - cons) // RING_DTYPE.itemsize
        n = min(avail, max_records)
        if n <= 0:
            return np.empty(0, RECORD_DTYPE)
        start = cons % self.data_size
        ring = self._data[start: start + n * RING_DTYPE.itemsize].view(RING_DTYPE)
        lens = ring["len"]
        busy = np.flatnonzero(lens & BPF_RINGBUF_BUSY_BIT)
        if len(busy):
            ring, lens = ring[: busy[0]], lens[: busy[0]]
        records = ring["rec"][(lens & BPF_RINGBUF_DISCARD_BIT) == 0].copy()
        self._consumer_pos[0] = cons + len(ring) * RING_DTYPE.itemsize
        return records

    def close(self) -> None:
        del self._consumer_pos, self._producer_pos, self._data
        self._consumer_map.close()
        self._producer_map.close()


# --------------------------------------------------------------------------------------------
# Records -> schema columns
# --------------------------------------------------------------------------------------------

EVENT_NAMES = pa.array([e.name for e in schema.EVENTS], pa.string())
_SIGNED = {pa.int8(), pa.int16(), pa.int32(), pa.int64()}


def _slot_tables() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per column: (slot index, shift, mask) indexed by event id; slot -1 where the event lacks it."""
    n = len(schema.EVENTS)
    tables: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for event_id, kind in enumerate(schema.EVENTS):
        for slot in SLOTS[kind.name]:
            if slot.column not in tables:
                tables[slot.column] = (np.full(n, -1, np.int64), np.zeros(n, np.uint64), np.zeros(n, np.uint64))
            index, shift, mask = tables[slot.column]
            index[event_id] = slot.index
            shift[event_id] = slot.shift
            mask[event_id] = np.uint64((1 << slot.bits) - 1)
    return tables


_SLOT_TABLES = _slot_tables()


def _column(values: np.ndarray, valid: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """u64 slot values as ``arrow_type``.  Signed values arrive sign-extended to 64 bits (the C
    casts them) or as their low bits (packed slots), so a truncating cast is exact for both."""
    if pa.types.is_boolean(arrow_type):
        array = values != 0
    elif arrow_type in _SIGNED:
        array = values.view(np.int64).astype(arrow_type.to_pandas_dtype())
    else:
        array = values.astype(arrow_type.to_pandas_dtype())
    return pa.array(array, arrow_type, mask=~valid)


def decode(records: np.ndarray) -> dict[str, pa.Array]:
    """Schema columns (name -> Arrow array) for a batch of records of any mix of events."""
    events = records["event"].astype(np.int64)
    vcpu = records["vcpu"]
    vm = records["vm"]
    columns: dict[str, pa.Array] = {
        "ts_ns": pa.array(records["ts_ns"], pa.uint64()),
        "cpu": pa.array(records["cpu"], pa.uint16()),
        "seq": pa.array(records["seq"], pa.uint32()),
        "pid": pa.array(records["pid"], pa.int32()),
        "tid": pa.array(records["tid"], pa.int32()),
        "vm": pa.array(vm, pa.uint64(), mask=vm == 0),
        "vcpu": pa.array(vcpu, pa.int32(), mask=vcpu < 0),
        "event": pa.DictionaryArray.from_arrays(pa.array(events.astype(np.int16)), EVENT_NAMES),
    }
    present = np.zeros(len(schema.EVENTS), bool)
    present[np.unique(events)] = True
    rows = np.arange(len(records))
    slots, nulls = records["f"], records["nulls"]
    for name, (index, shift, mask) in _SLOT_TABLES.items():
        if not present[index >= 0].any():
            continue
        idx = index[events]
        valid = idx >= 0
        safe = np.where(valid, idx, 0)
        valid &= (nulls >> safe.astype(np.uint32)) & 1 == 0
        values = (slots[rows, safe] >> shift[events]) & mask[events]
        columns[name] = _column(values, valid, schema.COLUMN_TYPES[name])
    return columns
