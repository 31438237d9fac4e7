"""``hugepages``: 2M guest mappings over THP-backed host memory (huge SPTEs, splits, collapse).

The guest maps the data with 2M PDEs (PS=1) and the host backs it with transparent huge pages
(MADV_HUGEPAGE on a 2M-aligned mapping), so a fault can install a level-2 SPTE
(``kvm_mmu_set_spte`` level 2; ``kvm_mmu_spte_requested`` shows the level KVM aimed for).  Turning
on dirty logging for the slot forbids huge SPTEs: KVM write-protects them, and writes then fault in
4K SPTEs (level 1) under new direct shadow pages.  No ``kvm_mmu_split_huge_page`` is seen here
despite ``eager_page_split``=Y (as far as the 6.12 source was read, eager splitting is a TDP-MMU
feature that only splits nested-guest shadow pages through the rmaps; not verified on the host).
Turning dirty logging off zaps the collapsible 4K SPTEs, so the next faults map 2M again.

size = guest data MiB (a multiple of 2).  Phases: ``fault`` makes 8 seeded random accesses in every
2 MiB region (a write first, so the first SPTE is writable); ``split`` enables dirty logging and
writes 8 random pages per region; ``collapse`` disables it and reads 8 random pages per region.
"""

from __future__ import annotations

import numpy as np

from mmutrace.kvm import HUGE_PAGE_SIZE, OP_READ, OP_WRITE, PAGE_SIZE, commands, uapi
from mmutrace.scenarios.base import DATA_GPA, DATA_SLOT, Scenario, ScenarioRun, page_addrs

PAGES_PER_REGION = HUGE_PAGE_SIZE // PAGE_SIZE
TOUCHES_PER_REGION = 8


def run(ctx: ScenarioRun) -> None:
    size = ctx.size << 20
    regions = size // HUGE_PAGE_SIZE
    guest = ctx.new_guest(16)
    aspace = guest.new_address_space()
    mem = ctx.data_memslot(aspace, size, huge=True, thp=True)
    vcpu = guest.add_vcpu(aspace)

    def region_pages() -> np.ndarray:
        offsets = ctx.rng.integers(0, PAGES_PER_REGION, (regions, TOUCHES_PER_REGION))
        return (np.arange(regions)[:, None] * PAGES_PER_REGION + offsets).ravel()

    ctx.phase("fault")
    pages = region_pages()
    ops = ctx.rng.choice([OP_READ, OP_WRITE], len(pages))
    ops[::TOUCHES_PER_REGION] = OP_WRITE  # a region's first access writes: its huge SPTE is writable at once
    guest.run(vcpu, commands(ops, page_addrs(pages), pages))

    ctx.phase("split")
    guest.vm.set_user_memory_region(DATA_SLOT, DATA_GPA, mem, flags=uapi.KVM_MEM_LOG_DIRTY_PAGES)
    pages = region_pages()
    guest.run(vcpu, commands(OP_WRITE, page_addrs(pages), pages))

    ctx.phase("collapse")
    guest.vm.set_user_memory_region(DATA_SLOT, DATA_GPA, mem, flags=0)
    guest.run(vcpu, commands(OP_READ, page_addrs(region_pages())))


SCENARIO = Scenario(
    name="hugepages",
    doc="2M guest mappings over THP host memory: level-2 SPTEs, split under dirty logging, collapse",
    default_size=32, size_unit="MiB", min_size=2, max_size=16384, size_step=2, body=run)
