"""``mmio_churn``: MMIO accesses around a memslot update of every kind (the MMIO SPTE's generation).

With ``mmio_caching=Y`` (the nested lab's L1) an MMIO SPTE embeds the memslot generation, which
every memslot publication advances by 2 (two address spaces): once for a create or a flags change,
twice for a delete or a move (the old slot is first published invalid).  A fault on an MMIO SPTE of
an older generation is not emulated from it (``check_mmio_spte`` fails): the normal fault path
marks it again with the current generation.  A delete or a move also zaps every SPTE (the fast
zap), so the MMIO SPTEs are simply made again.  With ``mmio_caching=N`` (this host) every access
faults and exits to userspace, as in ``mmio``.

size = pages of the MMIO window (at ``MMIO_GPA``, backed by no memslot).  Phases: ``mmio`` reads
every MMIO page, twice round (each round in a seeded order); then ``create`` (a spare slot at ``SPARE_GPA``, never accessed),
``flags`` (dirty logging on the spare slot), ``move`` (the spare slot to ``MOVED_GPA``) and
``delete`` (the spare slot) each make their update and read every MMIO page twice round again.
"""

from __future__ import annotations

import numpy as np

from mmutrace.kvm import OP_READ, PAGE_SIZE, commands, uapi
from mmutrace.scenarios.base import Scenario, ScenarioRun, pt_pages_for
from mmutrace.scenarios.mmio import MMIO_GPA, MMIO_READ_PATTERN, mmio_device

SPARE_SLOT = 2
#: 4 GiB and 5 GiB: above the data and MMIO windows, mapped by no guest table.
SPARE_GPA = 4 << 30
MOVED_GPA = 5 << 30
SPARE_PAGES = 16
#: The memslot update of each phase after the first.
UPDATES = ("create", "flags", "move", "delete")


def run(ctx: ScenarioRun) -> None:
    n = ctx.size
    guest = ctx.new_guest(pt_pages_for(n * PAGE_SIZE), mmio=mmio_device)
    aspace = guest.new_address_space()
    aspace.map(MMIO_GPA, MMIO_GPA, n * PAGE_SIZE)
    vcpu = guest.add_vcpu(aspace)
    vm = guest.vm
    spare = ctx.memory(SPARE_PAGES * PAGE_SIZE)
    window = np.uint64(MMIO_GPA) + np.arange(n, dtype=np.uint64) * np.uint64(PAGE_SIZE)

    def read_window(phase: str) -> None:
        """Every MMIO page, then every page again, each round in a seeded order."""
        seen = commands(OP_READ, np.concatenate([ctx.rng.permutation(window), ctx.rng.permutation(window)]))
        exits_before = guest.mmio_exits
        guest.run(vcpu, seen)
        ctx.details[f"{phase}_mmio_exits"] = guest.mmio_exits - exits_before
        ctx.details[f"{phase}_reads_answered"] = int(np.count_nonzero(seen["value"] == seen["addr"]
                                                                      ^ np.uint64(MMIO_READ_PATTERN)))

    ctx.phase("mmio")
    read_window("mmio")
    for phase in UPDATES:
        ctx.phase(phase)
        if phase == "create":
            vm.set_user_memory_region(SPARE_SLOT, SPARE_GPA, spare)
        elif phase == "flags":
            vm.set_user_memory_region(SPARE_SLOT, SPARE_GPA, spare, flags=uapi.KVM_MEM_LOG_DIRTY_PAGES)
        elif phase == "move":
            vm.set_user_memory_region(SPARE_SLOT, MOVED_GPA, spare, flags=uapi.KVM_MEM_LOG_DIRTY_PAGES)
        else:
            vm.delete_memslot(SPARE_SLOT)
        read_window(phase)


SCENARIO = Scenario(
    name="mmio_churn",
    doc="MMIO accesses after a memslot create, flags change, move and delete: the MMIO SPTE generation",
    default_size=4, size_unit="MMIO pages", min_size=1, max_size=512, body=run)
