"""``multi_vcpu``: two vCPU threads fault shared and private pages at the same time.

Both vCPUs run the interpreter concurrently (one host thread each; ``KVM_RUN`` drops the GIL), under
one address space, so their faults race for ``mmu_lock`` and for the same shadow pages: a shared
page may be faulted by either vCPU, the loser of a race finds the SPTE already present
(``RET_PF_SPURIOUS``) or retries.  Private pages are faulted only by their own vCPU.

size = N data pages: the first half is shared, the second half is split into one private range per
vCPU.  Phase ``parallel``: each vCPU accesses every shared page and each of its private pages once,
in its own seeded random order with random read/write; ``shared_write``: both write every shared
page again in their own orders.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mmutrace.kvm import OP_READ, OP_WRITE, PAGE_SIZE, Guest, Vcpu, commands
from mmutrace.scenarios.base import Scenario, ScenarioRun, page_addrs, pt_pages_for

VCPUS = 2
PHASES = ("parallel", "shared_write")


def vcpu_thread(guest: Guest, vcpu: Vcpu, phases: list[np.ndarray], barrier: threading.Barrier) -> None:
    """One host thread per vCPU for the whole run (as in QEMU): each phase starts and ends on the barrier."""
    try:
        for cmds in phases:
            barrier.wait()
            guest.run(vcpu, cmds)
            barrier.wait()
    except BaseException:
        barrier.abort()
        raise


def run(ctx: ScenarioRun) -> None:
    n = ctx.size
    shared = n // 2
    private = (n - shared) // VCPUS
    guest = ctx.new_guest(pt_pages_for(n * PAGE_SIZE), vcpus=VCPUS)
    aspace = guest.new_address_space()
    ctx.data_memslot(aspace, n * PAGE_SIZE)
    vcpus = [guest.add_vcpu(aspace) for _ in range(VCPUS)]

    def plan(pages: np.ndarray, write_only: bool = False) -> np.ndarray:
        order = ctx.rng.permutation(pages)
        ops = OP_WRITE if write_only else ctx.rng.choice([OP_READ, OP_WRITE], len(order))
        return commands(ops, page_addrs(order), order)

    # Every access is planned before any thread starts, so the sequence does not depend on timing.
    plans = [[plan(np.concatenate([np.arange(shared), shared + i * private + np.arange(private)])),
              plan(np.arange(shared), write_only=True)] for i in range(VCPUS)]
    barrier = threading.Barrier(VCPUS + 1)
    with ThreadPoolExecutor(VCPUS) as pool:
        threads = [pool.submit(vcpu_thread, guest, vcpu, phases, barrier) for vcpu, phases in zip(vcpus, plans)]
        try:
            for phase in PHASES:
                ctx.phase(phase)
                barrier.wait()
                barrier.wait()
        except threading.BrokenBarrierError:
            pass  # a vCPU thread failed: its exception is raised below
        for thread in threads:
            thread.result()
    ctx.details["vcpu_tids"] = [vcpu.tid for vcpu in vcpus]
    ctx.details["private_pages"] = [[shared + i * private, shared + (i + 1) * private] for i in range(VCPUS)]


SCENARIO = Scenario(
    name="multi_vcpu",
    doc="two vCPU threads faulting shared and private pages concurrently: mmu_lock races, spurious faults",
    default_size=1024, size_unit="pages", min_size=2 * VCPUS, max_size=1 << 20, body=run)
