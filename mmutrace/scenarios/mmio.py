"""``mmio``: guest accesses to guest-physical addresses that no memslot backs (emulated MMIO).

The guest's tables map an MMIO window at ``MMIO_GPA`` where the VM has no memslot.  The first
access to each page faults; KVM finds no slot and, with ``mmio_caching=N`` (this host), installs no
MMIO SPTE (no ``mark_mmio_spte``), so *every* access faults, is emulated, and exits to userspace as
KVM_EXIT_MMIO (``kvm_mmio`` events); the harness answers reads with ``gpa ^ MMIO_READ_PATTERN``.
Hosts with MMIO caching would instead cache an MMIO SPTE on the first fault and take later
accesses through ``handle_mmio_page_fault``.  Ordinary data pages are accessed in between so
the MMIO faults sit among normal ones.

size = number of MMIO accesses.  Phases: ``data`` writes 64 data pages; ``mmio`` interleaves the
planned MMIO reads and writes (seeded addresses in a 16-page window, qword aligned) with reads of
the data pages.  ``details`` holds the planned count, the exits seen and the reads answered right.
"""

from __future__ import annotations

import numpy as np

from mmutrace.kvm import OP_READ, OP_WRITE, PAGE_SIZE, commands
from mmutrace.scenarios.base import Scenario, ScenarioRun, page_addrs, pt_pages_for

#: 3 GiB: mapped by the guest, backed by no memslot.
MMIO_GPA = 3 << 30
MMIO_PAGES = 16
DATA_PAGES = 64
MMIO_READ_PATTERN = 0x5A5A_0000_0000_0000


def mmio_device(gpa: int, is_write: bool, value: int) -> int:
    """The emulated device: reads return a value derived from the address; writes are dropped."""
    return gpa ^ MMIO_READ_PATTERN


def run(ctx: ScenarioRun) -> None:
    n = ctx.size
    guest = ctx.new_guest(pt_pages_for(DATA_PAGES * PAGE_SIZE, MMIO_PAGES * PAGE_SIZE), mmio=mmio_device)
    aspace = guest.new_address_space()
    ctx.data_memslot(aspace, DATA_PAGES * PAGE_SIZE)
    aspace.map(MMIO_GPA, MMIO_GPA, MMIO_PAGES * PAGE_SIZE)
    vcpu = guest.add_vcpu(aspace)

    ctx.phase("data")
    guest.run(vcpu, commands(OP_WRITE, page_addrs(range(DATA_PAGES)), 1))

    ctx.phase("mmio")
    qwords = ctx.rng.integers(0, MMIO_PAGES * PAGE_SIZE // 8, n).astype(np.uint64)
    mmio_addrs = np.uint64(MMIO_GPA) + qwords * np.uint64(8)
    mmio_ops = ctx.rng.choice([OP_READ, OP_WRITE], n)
    data_addrs = page_addrs(ctx.rng.integers(0, DATA_PAGES, n))
    cmds = commands(np.column_stack([mmio_ops, np.full(n, OP_READ)]).ravel(),
                    np.column_stack([mmio_addrs, data_addrs]).ravel(), 0)
    exits_before = guest.mmio_exits
    guest.run(vcpu, cmds)
    reads = cmds[::2][mmio_ops == OP_READ]
    ctx.details["mmio_planned"] = n
    ctx.details["mmio_exits"] = guest.mmio_exits - exits_before
    answered = reads["value"] == reads["addr"] ^ np.uint64(MMIO_READ_PATTERN)
    ctx.details["mmio_reads_answered"] = int(np.count_nonzero(answered))
    ctx.details["mmio_reads"] = len(reads)


SCENARIO = Scenario(
    name="mmio",
    doc="accesses to guest-physical addresses without a memslot: emulated MMIO exits (no MMIO SPTEs, mmio_caching=N)",
    default_size=256, size_unit="accesses", min_size=1, max_size=1 << 20, body=run)
