"""``dirty_log``: dirty-page logging rounds with KVM_GET_DIRTY_LOG, then KVM_CLEAR_DIRTY_LOG.

With ``KVM_MEM_LOG_DIRTY_PAGES`` on a slot, KVM maps its pages write-protected and records the
first write to each page in the slot's bitmap.  ``KVM_GET_DIRTY_LOG`` returns the bitmap and, in
the classic mode, write-protects the dirty pages again (rmap walk, ``kvm_mmu_spte_changed``-style
SPTE updates), so the next write to such a page faults again.  With
``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` enabled, GET only reports and ``KVM_CLEAR_DIRTY_LOG``
re-protects the pages it is given.

size = N data pages.  Phases: ``get_<r>`` for 3 rounds: the guest writes a seeded random quarter of
the pages, the host reads the bitmap; ``clear_<r>`` (when the capability exists) for 3 rounds: the
same, then CLEAR with the bitmap read, in two calls (pages below the 64-aligned half, then the rest,
so that ``first_page`` is not always 0).  ``details['rounds']`` lists, per round, the pages written
and the pages the bitmap reported, and whether they are the same set; ``details['enable_cap']`` the
capability and ``args[0]`` enabled, ``details['clears']`` each CLEAR's slot, first page, page count
and its mask as 64-bit words (what the recorder's ``ioctl_dirty_bitmap`` rows must carry).
"""

from __future__ import annotations

import numpy as np

from mmutrace.kvm import OP_WRITE, PAGE_SIZE, commands, uapi
from mmutrace.scenarios.base import DATA_SLOT, Scenario, ScenarioRun, page_addrs, pt_pages_for

ROUNDS = 3


def run(ctx: ScenarioRun) -> None:
    n = ctx.size
    guest = ctx.new_guest(pt_pages_for(n * PAGE_SIZE))
    aspace = guest.new_address_space()
    ctx.data_memslot(aspace, n * PAGE_SIZE, flags=uapi.KVM_MEM_LOG_DIRTY_PAGES)
    vcpu = guest.add_vcpu(aspace)
    vm = guest.vm
    rounds: list[dict[str, object]] = []
    clears: list[dict[str, object]] = []
    half = (n // 2) & ~63
    ranges = [(0, half), (half, n)] if half else [(0, n)]

    def write_round(label: str, clear: bool) -> None:
        ctx.phase(label)
        pages = np.sort(ctx.rng.choice(n, max(1, n // 4), replace=False))
        guest.run(vcpu, commands(OP_WRITE, page_addrs(pages), pages))
        dirty = vm.get_dirty_log(DATA_SLOT)
        if clear:
            for first, end in ranges:
                words = vm.clear_dirty_log(DATA_SLOT, dirty[first:end], first)
                clears.append({"phase": label, "slot": DATA_SLOT, "first_page": first, "num_pages": end - first,
                               "bitmap": [int(w) for w in words]})
        reported = np.flatnonzero(dirty)
        rounds.append({"phase": label, "written": len(pages), "dirty": len(reported),
                       "exact": bool(np.array_equal(reported, pages))})

    for r in range(ROUNDS):
        write_round(f"get_{r}", clear=False)
    manual = vm.check_extension(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
    if manual & uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
        vm.enable_cap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        ctx.details["enable_cap"] = [uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE]
        for r in range(ROUNDS):
            write_round(f"clear_{r}", clear=True)
    ctx.details["manual_protect"] = bool(manual)
    ctx.details["rounds"] = rounds
    ctx.details["clears"] = clears


SCENARIO = Scenario(
    name="dirty_log",
    doc="KVM_MEM_LOG_DIRTY_PAGES rounds with KVM_GET_DIRTY_LOG and KVM_CLEAR_DIRTY_LOG: write-protect and refault",
    default_size=1024, size_unit="pages", min_size=4, max_size=1 << 20, body=run)
