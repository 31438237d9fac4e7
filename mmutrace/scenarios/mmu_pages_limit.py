"""``mmu_pages_limit``: KVM_SET_NR_MMU_PAGES at the minimum, with a working set that needs more.

``KVM_SET_NR_MMU_PAGES`` caps the VM's shadow pages (the kernel refuses goals below 64 with EINVAL).
Touching one page in every 2 MiB region of a 256 MiB guest needs one level-1 shadow page per
region (128) plus the upper levels, so while faulting, ``make_mmu_pages_available()`` finds the
quota exhausted and evicts the oldest unused shadow pages from the active list
(``kvm_mmu_prepare_zap_page`` between the start and end markers, not only at teardown).  The
second pass refaults what the first pass lost.

size = guest data MiB (a multiple of 2; one touch per 2 MiB).  Phases: ``limit`` sets the quota;
``pass1`` touches a seeded random page of each 2 MiB region in address order; ``pass2`` touches
the same pages in a seeded random order.
"""

from __future__ import annotations

import numpy as np

from mmutrace.kvm import HUGE_PAGE_SIZE, OP_READ, OP_WRITE, PAGE_SIZE, commands
from mmutrace.scenarios.base import Scenario, ScenarioRun, page_addrs, pt_pages_for

#: The smallest goal KVM_SET_NR_MMU_PAGES accepts (KVM_MIN_ALLOC_MMU_PAGES).
KVM_MIN_ALLOC_MMU_PAGES = 64
PAGES_PER_REGION = HUGE_PAGE_SIZE // PAGE_SIZE


def run(ctx: ScenarioRun) -> None:
    size = ctx.size << 20
    regions = size // HUGE_PAGE_SIZE
    guest = ctx.new_guest(pt_pages_for(size))
    aspace = guest.new_address_space()
    ctx.data_memslot(aspace, size)
    vcpu = guest.add_vcpu(aspace)

    ctx.phase("limit")
    guest.vm.set_nr_mmu_pages(KVM_MIN_ALLOC_MMU_PAGES)
    pages = np.arange(regions) * PAGES_PER_REGION + ctx.rng.integers(0, PAGES_PER_REGION, regions)

    ctx.phase("pass1")
    guest.run(vcpu, commands(OP_WRITE, page_addrs(pages), pages))
    ctx.phase("pass2")
    order = ctx.rng.permutation(pages)
    seen = commands(OP_READ, page_addrs(order))
    guest.run(vcpu, seen)
    ctx.details["nr_mmu_pages"] = KVM_MIN_ALLOC_MMU_PAGES
    ctx.details["read_back"] = int(np.count_nonzero(seen["value"] == order))


SCENARIO = Scenario(
    name="mmu_pages_limit",
    doc="KVM_SET_NR_MMU_PAGES 64 with one touch per 2 MiB: the quota evicts shadow pages mid-run",
    default_size=256, size_unit="MiB", min_size=2, max_size=16384, size_step=2, body=run)
