"""What every scenario shares: its declaration, the run context handed to its body, its result."""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from mmutrace.errors import UsageError
from mmutrace.kvm import PAGE_SIZE, AddressSpace, Guest, HostMemory
from mmutrace.markers import Markers

#: Guest-physical (and, identity-mapped, guest-virtual) base of scenario data memslots: 1 GiB,
#: far above the system memslot, 1 GiB-aligned so 2M guest mappings line up with host huge pages.
DATA_GPA = 1 << 30
DATA_SLOT = 1


@dataclass
class ScenarioResult:
    """What a run did.  ``accesses_digest`` is the sha256 of the exact guest access sequence."""

    name: str
    seed: int
    size: int
    pid: int
    pages_touched: int
    guest_exits: int
    wall_s: float
    accesses_digest: str
    markers: list[tuple[int, str]]
    details: dict[str, Any] = field(default_factory=dict)
    #: CPU time of the scenario's (and its vCPU's) thread at each marker (Markers.cpu_ns)
    marker_cpu_ns: list[int] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class ScenarioRun:
    """The context a scenario body drives: seeded RNG, phase markers, guest and memory it owns.

    Everything created through it is closed when the run ends, so a failing body leaves no VM.
    """

    def __init__(self, name: str, seed: int, size: int, markers: Markers, stack: ExitStack) -> None:
        self.name, self.seed, self.size, self.markers = name, seed, size, markers
        self.rng = np.random.default_rng(seed)
        self.details: dict[str, Any] = {}
        self._stack = stack
        self.guest: Guest | None = None

    def phase(self, phase: str) -> None:
        """Mark the start of a phase: ``<scenario>:<phase>``."""
        self.markers.emit(f"{self.name}:{phase}")

    def new_guest(self, pt_pages: int, **kwargs: Any) -> Guest:
        self.guest = self._stack.enter_context(Guest(pt_pages, **kwargs))
        return self.guest

    def memory(self, size: int, **kwargs: Any) -> HostMemory:
        mem = HostMemory(size, **kwargs)
        self._stack.callback(mem.close)
        return mem

    def data_memslot(self, spaces: AddressSpace | Sequence[AddressSpace], size: int, *, huge: bool = False,
                     thp: bool | None = None, flags: int = 0) -> HostMemory:
        """Back ``size`` bytes at DATA_GPA with fresh host memory (slot DATA_SLOT), identity-mapped
        in each of ``spaces`` (2M guest pages when ``huge``; ``thp`` as in HostMemory)."""
        assert self.guest is not None
        mem = self.memory(size, thp=thp)
        self.guest.vm.set_user_memory_region(DATA_SLOT, DATA_GPA, mem, flags=flags)
        for aspace in [spaces] if isinstance(spaces, AddressSpace) else spaces:
            aspace.map(DATA_GPA, DATA_GPA, size, huge=huge)
        return mem


def page_addrs(pages: np.ndarray | range, base: int = DATA_GPA) -> np.ndarray:
    """Guest addresses of page numbers ``pages`` counted from ``base``."""
    return np.uint64(base) + np.asarray(pages, dtype=np.uint64) * np.uint64(PAGE_SIZE)


def pt_pages_for(*sizes: int) -> int:
    """Page-table pages one 4K-mapped address space needs for regions of these byte sizes, plus slack."""
    return sum(-(-s // (2 << 20)) + -(-s // (1 << 30)) for s in sizes) + 8


@dataclass(frozen=True)
class Scenario:
    """A built-in scenario: ``doc`` says in one line which MMU behaviour it drives."""

    name: str
    doc: str
    default_size: int
    size_unit: str
    min_size: int
    max_size: int
    body: Callable[[ScenarioRun], None]
    size_step: int = 1

    def check_size(self, size: int) -> int:
        step = f" in steps of {self.size_step}" if self.size_step > 1 else ""
        if not self.min_size <= size <= self.max_size or size % self.size_step:
            raise UsageError(f"scenario {self.name!r}: size must be {self.min_size}..{self.max_size} "
                             f"{self.size_unit}{step}, got {size}")
        return size

    def run(self, seed: int = 0, size: int | None = None, markers: Markers | None = None) -> ScenarioResult:
        """Run the body in a fresh guest; markers ``<name>:start`` and ``<name>:end`` frame it."""
        if not 0 <= seed < 2**63:
            raise UsageError(f"seed must be 0..2**63-1, got {seed}")
        size = self.check_size(self.default_size if size is None else size)
        markers = Markers() if markers is None else markers
        t0 = time.perf_counter()
        with ExitStack() as stack:
            ctx = ScenarioRun(self.name, seed, size, markers, stack)
            markers.emit(f"{self.name}:start")
            self.body(ctx)
            markers.emit(f"{self.name}:end")
            guest = ctx.guest
            assert guest is not None, f"scenario {self.name} ran no guest"
            return ScenarioResult(
                name=self.name, seed=seed, size=size, pid=os.getpid(), pages_touched=guest.pages_touched,
                guest_exits=guest.exits, wall_s=round(time.perf_counter() - t0, 6),
                accesses_digest=guest.accesses_digest, markers=list(markers.log), details=ctx.details,
                marker_cpu_ns=list(markers.cpu_ns))
