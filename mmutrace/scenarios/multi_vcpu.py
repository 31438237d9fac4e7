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

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mmutrace.kvm import OP_READ, OP_WRITE, PAGE_SIZE, Guest, Vcpu, commands
from mmutrace.scenarios.base import Scenario, ScenarioRun, page_addrs, pt_pages_for

VCPUS = 2


def run_parallel(guest: Guest, plans: list[tuple[Vcpu, np.ndarray]]) -> None:
    """Run each vCPU's commands in its own thread; re-raise the first failure."""
    with ThreadPoolExecutor(len(plans)) as pool:
        for future in [pool.submit(guest.run, vcpu, cmds) for vcpu, cmds in plans]:
            future.result()


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

    ctx.phase("parallel")
    run_parallel(guest, [
        (vcpu, plan(np.concatenate([np.arange(shared), shared + i * private + np.arange(private)])))
        for i, vcpu in enumerate(vcpus)])
    ctx.phase("shared_write")
    run_parallel(guest, [(vcpu, plan(np.arange(shared), write_only=True)) for vcpu in vcpus])


SCENARIO = Scenario(
    name="multi_vcpu",
    doc="two vCPU threads faulting shared and private pages concurrently: mmu_lock races, spurious faults",
    default_size=1024, size_unit="pages", min_size=2 * VCPUS, max_size=1 << 20, body=run)
