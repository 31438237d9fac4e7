"""``unmap_refault``: the host drops guest memory with madvise(MADV_DONTNEED) between phases.

MADV_DONTNEED unmaps the host pages behind a memslot; the MMU notifier tells KVM
(``kvm_unmap_hva_range``), which zaps the SPTEs mapping those gfns through the rmaps.  The guest's
next access to such a page faults again and gets a fresh zero page (``kvm_mmu_set_spte`` with a new
pfn), while pages the host kept still hold their data and do not fault.

size = N data pages.  Phases: ``fault`` writes every page (value = page number + 1); ``unmap``
discards a seeded random half of the 16-page chunks; ``refault`` reads every page in a seeded random order; discarded pages
read 0, kept pages their value (``details`` counts both).

The memory is 4K-backed on every host (MADV_NOHUGEPAGE): where THP backs it (Debian's default
policy, so in the nested lab's L1), MADV_DONTNEED of 16 pages first splits their 2M page, and that
split reaches KVM as a 2M ``kvm_unmap_hva_range`` the trace cannot tell from a discard, hiding
which host pages survived (docs/undecidable.md).
"""

from __future__ import annotations

import numpy as np

from mmutrace.kvm import OP_READ, OP_WRITE, PAGE_SIZE, commands
from mmutrace.scenarios.base import Scenario, ScenarioRun, page_addrs, pt_pages_for

CHUNK_PAGES = 16


def run(ctx: ScenarioRun) -> None:
    n = ctx.size
    guest = ctx.new_guest(pt_pages_for(n * PAGE_SIZE))
    aspace = guest.new_address_space()
    mem = ctx.data_memslot(aspace, n * PAGE_SIZE, thp=False)
    vcpu = guest.add_vcpu(aspace)
    pages = np.arange(n, dtype=np.uint64)

    ctx.phase("fault")
    guest.run(vcpu, commands(OP_WRITE, page_addrs(pages), pages + np.uint64(1)))

    ctx.phase("unmap")
    chunks = -(-n // CHUNK_PAGES)
    dropped = np.sort(ctx.rng.choice(chunks, chunks // 2, replace=False))
    for chunk in dropped:
        start = int(chunk) * CHUNK_PAGES * PAGE_SIZE
        mem.discard(start, min(CHUNK_PAGES * PAGE_SIZE, mem.size - start))

    ctx.phase("refault")
    order = ctx.rng.permutation(pages)
    seen = commands(OP_READ, page_addrs(order))
    guest.run(vcpu, seen)
    discarded = np.isin(order // np.uint64(CHUNK_PAGES), dropped)
    ctx.details["discarded_pages"] = int(discarded.sum())
    ctx.details["discarded_read_zero"] = int(np.count_nonzero(seen["value"][discarded] == 0))
    ctx.details["kept_read_back"] = int(np.count_nonzero(seen["value"][~discarded] == order[~discarded] + 1))


SCENARIO = Scenario(
    name="unmap_refault",
    doc="host madvise(MADV_DONTNEED) of guest memory between phases: MMU-notifier zaps, then refaults",
    default_size=1024, size_unit="pages", min_size=2 * CHUNK_PAGES, max_size=1 << 20, body=run)
