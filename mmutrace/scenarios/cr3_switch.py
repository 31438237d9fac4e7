"""``cr3_switch``: several guest address spaces, switched between batches (roots created, reused, released).

Every address space is its own 4-level tree (its own CR3) mapping the same data pages.  A CR3 load
through KVM_SET_SREGS resets the vCPU's MMU context: the current root's ``root_count`` drops
(released) and the next entry looks the new CR3's root up by (gfn, role) — ``kvm_mmu_get_page`` with
``created`` the first time a tree runs, and ``created``=0 (reused, still hashed) when it returns.
Each tree's upper tables are distinct guest pages, so every tree has its own shadow pages; its
leaf tables are distinct too, so data pages fault once per tree.

size = number of address spaces K.  Phases: ``create`` runs each tree once in order (K new roots);
``switch`` runs 4*K batches, each under a seeded random tree, touching 32 random data pages.
"""

from __future__ import annotations

from mmutrace.kvm import OP_READ, OP_WRITE, PAGE_SIZE, commands
from mmutrace.scenarios.base import Scenario, ScenarioRun, page_addrs, pt_pages_for

DATA_PAGES = 256
TOUCHES_PER_BATCH = 32


def run(ctx: ScenarioRun) -> None:
    k = ctx.size
    guest = ctx.new_guest(k * pt_pages_for(DATA_PAGES * PAGE_SIZE))
    spaces = [guest.new_address_space() for _ in range(k)]
    ctx.data_memslot(spaces, DATA_PAGES * PAGE_SIZE)
    vcpu = guest.add_vcpu(spaces[0])
    ctx.details["root_gfns"] = [aspace.cr3 >> 12 for aspace in spaces]

    def batch(aspace_index: int) -> None:
        guest.set_cr3(vcpu, spaces[aspace_index])
        pages = ctx.rng.choice(DATA_PAGES, TOUCHES_PER_BATCH, replace=False)
        ops = ctx.rng.choice([OP_READ, OP_WRITE], TOUCHES_PER_BATCH)
        guest.run(vcpu, commands(ops, page_addrs(pages), pages))

    ctx.phase("create")
    for i in range(k):
        batch(i)
    ctx.phase("switch")
    switches = ctx.rng.integers(0, k, 4 * k)
    for i in switches:
        batch(int(i))
    ctx.details["switches"] = len(switches)


SCENARIO = Scenario(
    name="cr3_switch",
    doc="several guest address spaces switched through CR3: shadow roots created, reused, released",
    default_size=8, size_unit="spaces", min_size=2, max_size=256, body=run)
