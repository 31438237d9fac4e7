"""What the trace reveals about guest memory and its host pages: the inputs of PTE prefetch.

FNAME(pte_prefetch) reads the 8-aligned group of guest PTEs around the fault's leaf with
``kvm_vcpu_read_guest_atomic`` and looks each neighbour's host page up with
``gfn_to_pfn_memslot_atomic`` (``gfn_to_page_many_atomic`` for direct pages); no tracepoint shows
either.  The trace still carries both, from earlier:

- a guest PTE is known from the walk that last read it (``kvm_mmu_paging_element``, with the A/D
  bits the walker then set), as long as the guest could not have written its table since.  The
  shadow MMU decides that (``ShadowMmu.learn_gpte``: a table with a writable SPTE is not learnt;
  installing one forgets it), and so do emulated writes, memslot changes and host unmaps here;
- a host page is known present and writable (what the atomic, FOLL_WRITE lookup needs) from a
  fault that got it writable (``kvm_mmu_spte_requested``'s pfn with a writable mapping), until an
  MMU-notifier unmap (``kvm_unmap_hva_range``) covers its hva.  Keyed by hva, so a memslot that is
  deleted and re-created over the same memory keeps its pages.

Anything else reads as None: the model then cannot predict that neighbour (docs/undecidable.md).
Used only when the memslot layout is known (the bcc recorder's ``ioctl_set_user_memory_region``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mmutrace.kvm.uapi import KVM_MEM_READONLY
from replay.spte import PAGE_SHIFT

if TYPE_CHECKING:
    from replay.mmu import Memslot

#: Guest PTEs FNAME(pte_prefetch) reads: an 8-aligned group.
PTE_PREFETCH_NUM = 8


def gfn_to_hva_memslot(slot: Memslot, gfn: int) -> int:
    return slot.userspace_addr + ((gfn - slot.base_gfn) << PAGE_SHIFT)


def drop_range(known: dict[int, Any], first: int, last: int) -> None:
    """Delete the keys in [first, last], walking whichever is shorter: the range or the dict."""
    if last - first < len(known):
        for key in range(first, last + 1):
            known.pop(key, None)
    else:
        for key in [k for k in known if first <= k <= last]:
            del known[key]


class GpteView(Sequence):
    """``kvm_vcpu_read_guest_atomic``'s PTEs read when indexed instead of copied, for a caller that
    reads them before anything can change them (the bulk path's prefetch check, replay/bulk.py)."""

    __slots__ = ("table", "gpa")

    def __init__(self, table: dict[int, int], gpa: int) -> None:
        self.table, self.gpa = table, gpa

    def __getitem__(self, i: int) -> int | None:  # type: ignore[override]
        return self.table.get(self.gpa + 8 * i)

    def __len__(self) -> int:
        return PTE_PREFETCH_NUM


#: No PTE of the table is known.
NO_GPTES: Sequence[int | None] = (None,) * PTE_PREFETCH_NUM


class GuestMemory:
    """Known guest PTEs (by gpa) and known present, writable host pages (by hva page)."""

    def __init__(self) -> None:
        #: table gfn -> {pte gpa: value}
        self.gptes: dict[int, dict[int, int]] = {}
        #: hva >> PAGE_SHIFT -> pfn
        self.host_pages: dict[int, int] = {}

    # ---- guest PTEs

    def observe_gpte(self, gpa: int, value: int) -> None:
        self.gptes.setdefault(gpa >> PAGE_SHIFT, {})[gpa] = value

    def kvm_vcpu_read_guest_atomic(self, gpa: int, count: int) -> list[int | None]:
        """``count`` 8-byte guest PTEs from ``gpa``: each one's value, or None where unknown."""
        table = self.gptes.get(gpa >> PAGE_SHIFT)
        if table is None:
            return [None] * count
        return list(map(table.get, range(gpa, gpa + 8 * count, 8)))

    def gpte_view(self, gpa: int) -> Sequence[int | None]:
        """kvm_vcpu_read_guest_atomic(gpa, PTE_PREFETCH_NUM) without the copy (see GpteView)."""
        table = self.gptes.get(gpa >> PAGE_SHIFT)
        return NO_GPTES if table is None else GpteView(table, gpa)

    def forget_gptes(self, first_gfn: int | None = None, last_gfn: int | None = None) -> None:
        """The guest (or the host) may have written the tables in [first_gfn, last_gfn]; all if None."""
        if first_gfn is None or last_gfn is None:
            self.gptes.clear()
        elif first_gfn == last_gfn:  # one table: a 4K SPTE made writable (every guest write fault)
            self.gptes.pop(first_gfn, None)
        else:
            drop_range(self.gptes, first_gfn, last_gfn)

    # ---- host pages

    def learn_pfn(self, slot: Memslot, gfn: int, pfn: int) -> None:
        """A fault mapped ``gfn`` to the present, writable host page ``pfn``."""
        self.host_pages[gfn_to_hva_memslot(slot, gfn) >> PAGE_SHIFT] = pfn

    def gfn_to_pfn_memslot_atomic(self, slot: Memslot, gfn: int) -> int | None:
        """The pfn a FOLL_WRITE fast-only lookup finds, or None when the trace does not tell
        (the page may be absent, read-only or never faulted: the lookup may fail or succeed; a
        read-only slot's pages are never learnt, their faults being read-only)."""
        return self.host_pages.get(gfn_to_hva_memslot(slot, gfn) >> PAGE_SHIFT)

    def kvm_unmap_hva_range(self, start: int, end: int) -> None:
        """An MMU-notifier invalidation: the host pages of [start, end) may be gone or read-only."""
        drop_range(self.host_pages, start >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT)

    def gfn_to_page_many_atomic(self, slot: Memslot, gfn: int, nr_pages: int) -> tuple[list[int], bool]:
        """The pfns get_user_pages_fast_only(FOLL_WRITE) pins from ``gfn`` on, and whether that is
        all it pins: it stops at the first page it cannot pin, and beyond the pages known present
        the trace does not tell.  A read-only slot or a run past the slot's end pins nothing."""
        if slot.flags & KVM_MEM_READONLY or slot.base_gfn + slot.npages - gfn < nr_pages:
            return [], True
        pfns = []
        for i in range(nr_pages):
            pfn = self.host_pages.get(gfn_to_hva_memslot(slot, gfn + i) >> PAGE_SHIFT)
            if pfn is None:
                return pfns, False
            pfns.append(pfn)
        return pfns, True
