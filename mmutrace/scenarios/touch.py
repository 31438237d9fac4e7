"""``touch``: sequential then random reads and writes over N fresh guest pages.

Drives the plain shadow-MMU fault path at every level: the first access to each page walks the
guest's 4-level tables (``kvm_mmu_pagetable_walk``), creates the missing shadow pages
(``kvm_mmu_get_page``) and installs one level-1 SPTE (``kvm_mmu_set_spte``).  Guest PTEs start with
A and D clear, so reads set A (``kvm_mmu_set_accessed_bit``) and map the page read-only, and the
later write to the same page faults again to set D (``kvm_mmu_set_dirty_bit``).  Because A is clear
when each page is first touched, no neighbouring SPTE is prefetched: each fresh page costs exactly
one level-1 ``kvm_mmu_set_spte`` in ``seq_read``.

size = N guest pages (4 KiB each).  Phases: ``seq_read`` reads pages [0, N/2) in order,
``seq_write`` writes the same pages, ``random`` reads or writes (coin flip per page) each page of
[N/2, N) once, in a random order.
"""

from __future__ import annotations

import numpy as np

from mmutrace.kvm import OP_READ, OP_WRITE, PAGE_SIZE, commands
from mmutrace.scenarios.base import Scenario, ScenarioRun, page_addrs, pt_pages_for


def run(ctx: ScenarioRun) -> None:
    n = ctx.size
    half = n // 2
    guest = ctx.new_guest(pt_pages_for(n * PAGE_SIZE))
    aspace = guest.new_address_space()
    ctx.data_memslot(aspace, n * PAGE_SIZE)
    vcpu = guest.add_vcpu(aspace)

    ctx.phase("seq_read")
    guest.run(vcpu, commands(OP_READ, page_addrs(range(half))))
    ctx.phase("seq_write")
    guest.run(vcpu, commands(OP_WRITE, page_addrs(range(half)), np.arange(half, dtype=np.uint64)))
    ctx.phase("random")
    order = half + ctx.rng.permutation(n - half)
    ops = np.where(ctx.rng.random(len(order)) < 0.5, OP_READ, OP_WRITE)
    guest.run(vcpu, commands(ops, page_addrs(order), order))


SCENARIO = Scenario(
    name="touch",
    doc="sequential and random reads/writes over N fresh pages: faults at every level, A/D bits",
    default_size=2048, size_unit="pages", min_size=2, max_size=1 << 21, body=run)
