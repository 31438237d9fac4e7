"""``memslot_churn``: delete, re-create and move a memslot between phases (fast zap, obsolete pages).

Deleting or moving a memslot must drop every SPTE that maps it.  With the default
``KVM_X86_QUIRK_SLOT_ZAP_ALL`` quirk, x86 does that with the "fast zap": bump
``mmu_valid_gen`` so every existing shadow page becomes obsolete (``kvm_mmu_zap_all_fast``), zap
them in batches, and let the vCPU reload fresh roots of the new generation (``kvm_mmu_get_page``
with the new ``mmu_valid_gen``).  The data lives on in host memory: a re-created or moved slot over
the same memory shows the same bytes.

The guest tables map the data at two guest-physical windows, ``DATA_GPA`` and ``MOVED_GPA``, so
the guest can follow the slot when it moves.

size = N data pages.  Phases: ``fault`` writes every page at DATA_GPA; ``delete`` deletes the slot;
``recreate`` re-creates it over the same memory and reads every page back; ``move`` moves it to
MOVED_GPA and reads a seeded random half of the pages there.
"""

from __future__ import annotations

import numpy as np

from mmutrace.kvm import OP_READ, OP_WRITE, PAGE_SIZE, commands
from mmutrace.scenarios.base import DATA_GPA, DATA_SLOT, Scenario, ScenarioRun, page_addrs, pt_pages_for

#: Where ``move`` puts the slot: 2 GiB, a second window mapped by the same guest tables.
MOVED_GPA = 2 << 30


def run(ctx: ScenarioRun) -> None:
    n = ctx.size
    size = n * PAGE_SIZE
    guest = ctx.new_guest(pt_pages_for(size, size))
    aspace = guest.new_address_space()
    mem = ctx.data_memslot(aspace, size)
    aspace.map(MOVED_GPA, MOVED_GPA, size)
    vcpu = guest.add_vcpu(aspace)
    vm = guest.vm
    pages = np.arange(n, dtype=np.uint64)

    ctx.phase("fault")
    guest.run(vcpu, commands(OP_WRITE, page_addrs(pages), pages + np.uint64(1)))

    ctx.phase("delete")
    vm.delete_memslot(DATA_SLOT)

    ctx.phase("recreate")
    vm.set_user_memory_region(DATA_SLOT, DATA_GPA, mem)
    seen = commands(OP_READ, page_addrs(pages))
    guest.run(vcpu, seen)
    ctx.details["recreated_read_back"] = int(np.count_nonzero(seen["value"] == pages + np.uint64(1)))

    ctx.phase("move")
    vm.set_user_memory_region(DATA_SLOT, MOVED_GPA, mem)
    half = np.sort(ctx.rng.choice(n, n // 2, replace=False)).astype(np.uint64)
    seen = commands(OP_READ, page_addrs(half, MOVED_GPA))
    guest.run(vcpu, seen)
    ctx.details["moved_read_back"] = int(np.count_nonzero(seen["value"] == half + np.uint64(1)))


SCENARIO = Scenario(
    name="memslot_churn",
    doc="delete, re-create and move a memslot between phases: zap_all_fast, obsolete shadow pages",
    default_size=512, size_unit="pages", min_size=2, max_size=1 << 18, body=run)
