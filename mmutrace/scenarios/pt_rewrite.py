"""``pt_rewrite``: the guest rewrites its own page tables (unsync / sync, emulated PTE writes).

Once the shadow MMU shadows a guest page-table page it write-protects that gfn.  A guest store to a
*leaf* table (level 1) is let through by marking the shadow page unsync (``kvm_mmu_unsync_page``)
instead of emulating it; the guest's new PTE is picked up when the vCPU next loads a root and KVM
resyncs unsync children (``kvm_mmu_sync_page``).  The guest cannot ``mov cr3`` at CPL3, so the host
plays the guest's TLB flush: KVM_SET_SREGS to another CR3 and back, which resets the MMU context so
the next entry re-loads the root and syncs.  A store to an *upper* table (level 2) can never be
unsync: it faults and is emulated, and repeated stores to the same shadowed page trip KVM's
write-flooding detection, which zaps that shadow page (``kvm_mmu_prepare_zap_page``).

size = N data pages.  Phases: ``map`` reads every page; ``rewrite`` stores to N/2 leaf PTEs,
pointing page i at the frame of page ``perm[i]`` (the first half rotated by a seeded shift);
``sync`` switches CR3 away and back and reads the rewritten pages, which must now show the data of
their new frames; ``rewrite_upper`` stores each data PDE back unchanged, 4 times.
"""

from __future__ import annotations

import numpy as np

from mmutrace.kvm import OP_READ, OP_WRITE, PAGE_SIZE, commands
from mmutrace.kvm.paging import PTE_USER_RW
from mmutrace.scenarios.base import DATA_GPA, Scenario, ScenarioRun, page_addrs, pt_pages_for

#: Stores per PDE in ``rewrite_upper``: KVM zaps a shadow page after 3 emulated writes in a row.
UPPER_REWRITES = 4


def run(ctx: ScenarioRun) -> None:
    n = ctx.size
    guest = ctx.new_guest(2 * pt_pages_for(n * PAGE_SIZE))
    aspace = guest.new_address_space()
    other = guest.new_address_space()
    mem = ctx.data_memslot(aspace, n * PAGE_SIZE)
    mem.u64[::PAGE_SIZE // 8] = np.arange(n, dtype=np.uint64)  # page i holds i in its first qword
    vcpu = guest.add_vcpu(aspace)

    ctx.phase("map")
    guest.run(vcpu, commands(OP_READ, page_addrs(range(n))))

    ctx.phase("rewrite")
    half = n // 2
    perm = (np.arange(half) + ctx.rng.integers(1, half)) % half  # a seeded rotation: no page keeps its frame
    ptes = np.array([aspace.pte_gpa(DATA_GPA + i * PAGE_SIZE) for i in range(half)], dtype=np.uint64)
    new_ptes = page_addrs(perm) | np.uint64(int(PTE_USER_RW))
    guest.run(vcpu, commands(OP_WRITE, ptes, new_ptes))
    ctx.details["leaf_table_gfns"] = sorted({int(p) >> 12 for p in ptes})

    ctx.phase("sync")
    guest.set_cr3(vcpu, other)
    guest.set_cr3(vcpu, aspace)
    seen = commands(OP_READ, page_addrs(range(half)))
    guest.run(vcpu, seen)
    ctx.details["remapped_pages_seen"] = int(np.count_nonzero(seen["value"] == perm))

    ctx.phase("rewrite_upper")
    pdes = np.unique([aspace.pte_gpa(DATA_GPA + i * PAGE_SIZE, level=2) for i in range(0, n, 512)])
    values = guest.sys.u64[(pdes // 8).astype(np.int64)]
    ctx.details["upper_table_gfns"] = sorted({int(p) >> 12 for p in pdes})
    guest.run(vcpu, commands(OP_WRITE, np.repeat(pdes, UPPER_REWRITES), np.repeat(values, UPPER_REWRITES)))


SCENARIO = Scenario(
    name="pt_rewrite",
    doc="the guest rewrites its own page tables: write-protected shadowed tables, unsync/sync, emulated writes",
    default_size=1024, size_unit="pages", min_size=4, max_size=1 << 18, body=run)
