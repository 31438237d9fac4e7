"""The record the probes write and what each of its slots holds, per event.

``struct mmu_record`` in mmu_events.bpf.c and ``RECORD_DTYPE`` here are the same bytes; ``SLOTS``
says, for each event, which schema column each ``f[i]`` (or bit range of it) carries, in the order
the C fills them.  The decoder (mmutrace/ringbuf.py) uses only this table, so a column moves by
editing the C and this table together; tests/test_probes.py checks both against tracefs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmutrace import schema

NR_SLOTS = 10
#: Slots of a small record (the ``small_events`` ring): events whose slots all fit go there.
SMALL_SLOTS = 2


def record_dtype(nr_slots: int) -> np.dtype:
    """``struct mmu_record`` (mmu_events.bpf.c) with ``nr_slots`` slots, without the ring buffer's
    8-byte record header."""
    return np.dtype([
        ("ts_ns", "<u8"), ("vm", "<u8"), ("seq", "<u4"), ("pid", "<i4"), ("tid", "<i4"), ("vcpu", "<i4"),
        ("cpu", "<u2"), ("event", "<u2"), ("nulls", "<u4"), ("f", "<u8", (nr_slots,)),
    ])


RECORD_DTYPE = record_dtype(NR_SLOTS)
assert RECORD_DTYPE.itemsize == 40 + 8 * NR_SLOTS
#: Each ring buffer map of the probes and the records it holds.
RINGS = {"events": RECORD_DTYPE, "small_events": record_dtype(SMALL_SLOTS)}



@dataclass(frozen=True)
class Slot:
    """Column ``column`` is bits ``[shift, shift+bits)`` of ``f[index]``."""

    column: str
    index: int
    shift: int = 0
    bits: int = 64


def _plain(*columns: str) -> tuple[Slot, ...]:
    """One column per slot, in order."""
    return tuple(Slot(col, i) for i, col in enumerate(columns))


def _mmu_pages(index: int) -> tuple[Slot, ...]:
    """``n_used_mmu_pages | n_max_mmu_pages << 32`` (mmu_pages() in the C)."""
    return Slot("mmu_used", index, 0, 32), Slot("mmu_max", index, 32, 32)


_MMU_PAGE = _plain("mmu_valid_gen", "gfn", "role", "root_count", "unsync", "sp")

SLOTS: dict[str, tuple[Slot, ...]] = {
    "kvm_mmu_pagetable_walk": _plain("addr", "error_code"),
    "kvm_mmu_paging_element": _plain("spte", "level"),
    "kvm_mmu_set_accessed_bit": _plain("addr"),
    "kvm_mmu_set_dirty_bit": _plain("addr"),
    "kvm_mmu_walker_error": _plain("error_code"),
    "kvm_mmu_get_page": _MMU_PAGE + (Slot("created", 6),) + _mmu_pages(7),
    "kvm_mmu_sync_page": _MMU_PAGE,
    "kvm_mmu_unsync_page": _MMU_PAGE,
    "kvm_mmu_prepare_zap_page": _MMU_PAGE + _mmu_pages(6),
    "kvm_mmu_zap_all_fast": (Slot("mmu_valid_gen", 0),) + _mmu_pages(1),
    "kvm_mmu_spte_requested": _plain("gfn", "pfn", "addr", "error_code") + (
        Slot("level", 4, 0, 8), Slot("max_level", 4, 8, 8), Slot("req_level", 4, 16, 8),
        Slot("map_writable", 4, 24, 1), Slot("prefetch", 4, 25, 1),
        Slot("slot_flags", 5, 0, 32), Slot("slot_id", 5, 32, 32),
        Slot("slot_base_gfn", 6), Slot("slot_npages", 7), Slot("slot_hva", 8),
    ) + _mmu_pages(9),
    "kvm_mmu_set_spte": _plain("gfn", "spte", "sptep", "level"),
    "kvm_mmu_split_huge_page": _plain("gfn", "spte", "level", "ret"),
    "kvm_tdp_mmu_spte_changed": _plain("as_id", "gfn", "level", "old_spte", "new_spte"),
    "fast_page_fault": _plain("addr", "error_code", "sptep", "old_spte", "new_spte", "ret"),
    "mark_mmio_spte": _plain("sptep", "gfn", "access", "gen"),
    "handle_mmio_page_fault": _plain("addr", "gfn", "access"),
    "check_mmio_spte": _plain("spte", "kvm_gen", "gen"),
    "kvm_page_fault": _plain("rip", "addr", "error_code"),
    "kvm_entry": _plain("rip") + _mmu_pages(1),
    "kvm_exit": _plain("exit_reason", "rip", "info1", "info2", "error_code"),
    "kvm_unmap_hva_range": _plain("addr", "end"),
    "kvm_age_hva": _plain("addr", "end"),
    "kvm_test_age_hva": _plain("addr"),
    "kvm_mmio": _plain("access", "size", "addr", "value"),
    "kvm_pio": _plain("access", "addr", "size", "count", "value"),
    "kvm_userspace_exit": _plain("exit_reason", "ret"),
    "ioctl_set_user_memory_region": _plain("slot_id", "slot_flags", "addr", "size", "slot_base_gfn",
                                           "slot_npages", "slot_hva"),
    "ioctl_set_nr_mmu_pages": _plain("count"),
    "ioctl_set_sregs": _plain("cr0", "cr3", "cr4", "efer"),
    "ioctl_get_dirty_log": _plain("slot_id"),
    "ioctl_clear_dirty_log": _plain("slot_id", "addr", "count", "size"),
    "ioctl_create_vm": (),
    "ioctl_create_vcpu": _plain("value"),
    "ioctl_ret": _plain("ioctl", "ret"),
    "ioctl_enable_cap": _plain("cap", "value"),
    "ioctl_dirty_bitmap": _plain("slot_id", "addr", "value"),
}

#: Columns the header carries for events whose tracefs format has them as fields.
HEADER_COLUMNS = {"vcpu"}


def is_small(event: str) -> bool:
    """Whether ``event``'s slots fit a small record (the C then writes it to ``small_events``)."""
    return all(s.index < SMALL_SLOTS for s in SLOTS[event])


def check_layout() -> None:
    """Every catalogue event has slots, and its slots fill exactly the columns the schema lists."""
    for kind in schema.EVENTS:
        filled = {s.column for s in SLOTS[kind.name]} | (set(kind.columns) & HEADER_COLUMNS)
        if filled != set(kind.columns):
            raise AssertionError(f"{kind.name}: slots fill {sorted(filled)}, schema lists {sorted(kind.columns)}")
        if any(s.index >= NR_SLOTS for s in SLOTS[kind.name]):
            raise AssertionError(f"{kind.name}: slot index beyond NR_SLOTS")
