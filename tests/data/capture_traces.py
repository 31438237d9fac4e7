"""Record the small real traces tests/test_replay*.py replay (tracefs capture of built-in scenarios).

    cd /work/main && .venv/bin/python tests/data/capture_traces.py [NAME=SIZE ...]

Each scenario runs in this process under a private tracefs instance filtered by its pid
(mmutrace.tracefs.Capture) and is written with mmutrace.storage's writer, with the host's metadata
(kernel release, kvm parameters) and ``recorder: tracefs``.  Output: tests/data/<name>.parquet.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from mmutrace import schema
from mmutrace.hostinfo import host_metadata
from mmutrace.kvm import OP_READ, OP_WRITE, PAGE_SIZE, commands
from mmutrace.kvm.paging import PT64_ADDR_MASK, Pte
from mmutrace.scenarios import run_scenario
from mmutrace.scenarios.base import Scenario, ScenarioRun, page_addrs, pt_pages_for
from mmutrace.storage import TraceWriter
from mmutrace.tracefs import Capture

def alias_body(ctx: ScenarioRun) -> None:
    """One guest page-directory-pointer table reached through two PML4 entries, the second
    read-only: the shadow MMU needs two shadow pages per table below (same gfn, roles differing in
    ``access``), so a hash lookup that ignored a role bit would reuse the wrong one."""
    n = ctx.size
    guest = ctx.new_guest(pt_pages_for(n * PAGE_SIZE))
    aspace = guest.new_address_space()
    ctx.data_memslot(aspace, n * PAGE_SIZE)
    root = aspace.pool.table(aspace.cr3)
    root[ALIAS_PML4] = np.uint64((int(root[0]) & PT64_ADDR_MASK) | int(Pte.PRESENT | Pte.USER))
    vcpu = guest.add_vcpu(aspace)
    pages = page_addrs(range(n))
    ctx.phase("direct")
    guest.run(vcpu, commands(OP_READ, pages))
    ctx.phase("alias")
    guest.run(vcpu, commands(OP_READ, pages + np.uint64(ALIAS_PML4 << 39)))
    ctx.phase("write")
    guest.run(vcpu, commands(OP_WRITE, pages, 1))


ALIAS_PML4 = 1
ALIAS = Scenario(name="alias", doc="one PDPT behind a writable and a read-only PML4 entry", default_size=32,
                 size_unit="pages", min_size=1, max_size=4096, body=alias_body)

DEFAULT = {"alias": 32, "touch": 256, "pt_rewrite": 64, "cr3_switch": 4, "unmap_refault": 64, "memslot_churn": 64,
           "dirty_log": 64, "mmu_pages_limit": 256, "hugepages": 8, "mmio": 32, "multi_vcpu": 128}


def capture(name: str, size: int, out: Path) -> Path:
    with Capture(tgid=os.getpid()) as cap:
        result = ALIAS.run(1, size) if name == "alias" else run_scenario(name, seed=1, size=size)
    table = cap.table()
    lost = {str(cpu): n for cpu, n in cap.lost_by_cpu.items()}
    meta = {**host_metadata(), "schema_version": schema.SCHEMA_VERSION, "recorder": "tracefs", "origin": "host",
            "lost": lost, "lost_total": sum(lost.values()), "start_ns": cap.start_ns, "stop_ns": cap.stop_ns,
            "scenario": {"name": name, "seed": 1, "size": size}, "markers": [
                {"ts_ns": ts, "text": text} for ts, text in result.markers], "complete": True,
            "command": ["tests/data/capture_traces.py", f"{name}={size}"]}
    path = out / f"{name}.parquet"
    with TraceWriter(path, metadata=meta, force=True) as writer:
        writer.write_batch(table)
    return path


def main(argv: list[str]) -> None:
    wanted = dict(arg.split("=") for arg in argv) if argv else DEFAULT
    out = Path(__file__).resolve().parent
    for name, size in wanted.items():
        print(capture(name, int(size), out))


if __name__ == "__main__":
    main(sys.argv[1:])
