"""A CPL3 long-mode guest: system memory (code, command buffers, page tables), vCPUs, batches.

Guest-physical layout of the system memslot (slot 0, at GPA 0, identity-mapped 4K in every
address space):

- ``CODE_GPA``: the interpreter (mmutrace.kvm.interpreter)
- ``CMD_GPA + i * CMD_BYTES``: vCPU i's command buffer
- then the page-table pool, sized by the caller

Scenario data lives in other memslots the scenario creates; it maps them with ``AddressSpace.map``.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np

from mmutrace.kvm import uapi
from mmutrace.kvm.interpreter import BATCH_PORT, COMMAND, INTERPRETER, OP_END
from mmutrace.kvm.memory import HUGE_PAGE_SIZE, PAGE_SIZE, HostMemory
from mmutrace.kvm.paging import AddressSpace, PageTablePool
from mmutrace.kvm.uapi import KvmExit
from mmutrace.kvm.vcpu import GuestCrash, Vcpu
from mmutrace.kvm.vm import Vm

SYS_SLOT = 0
CODE_GPA = 0x1000
CMD_GPA = 0x10000
CMD_CAPACITY = 4096  # commands per batch, the OP_END included
CMD_BYTES = CMD_CAPACITY * COMMAND.itemsize

X86_CR0_PE, X86_CR0_ET, X86_CR0_NE, X86_CR0_WP, X86_CR0_PG = 1 << 0, 1 << 4, 1 << 5, 1 << 16, 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME, EFER_LMA, EFER_NX = 1 << 8, 1 << 10, 1 << 11
X86_EFLAGS_IOPL3 = 3 << 12
X86_EFLAGS_FIXED = 1 << 1
#: Selectors as Linux uses them for user mode (GDT index 6 / 5, RPL 3).
USER_CS, USER_DS = 0x33, 0x2B

#: Answers a guest MMIO access: (gpa, is_write, written value) -> value a read returns.
MmioHandler = Callable[[int, bool, int], int]


def _user_segment(selector: int, code: bool) -> uapi.kvm_segment:
    """A flat DPL3 segment: 64-bit code (L=1) or writable data."""
    return uapi.kvm_segment(base=0, limit=0xFFFFFFFF, selector=selector, type=0xB if code else 0x3, present=1,
                            dpl=3, db=0 if code else 1, s=1, l=1 if code else 0, g=1)


class Guest:
    """One VM running the interpreter at CPL3 on one or more vCPUs.

    ``pt_pages`` sizes the page-table pool (all address spaces share it).  ``accesses_digest``
    hashes every batch each vCPU executes (and the CR3 it ran under), per vCPU, so concurrent vCPUs
    still give a deterministic digest.
    """

    def __init__(self, pt_pages: int, vcpus: int = 1, mmio: MmioHandler | None = None) -> None:
        self.vm = Vm()
        pool_start = CMD_GPA + vcpus * CMD_BYTES
        sys_size = -(-(pool_start + pt_pages * PAGE_SIZE) // HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE
        self.sys = HostMemory(sys_size)
        self.sys.u8[CODE_GPA:CODE_GPA + len(INTERPRETER)] = np.frombuffer(INTERPRETER, np.uint8)
        self.vm.set_user_memory_region(SYS_SLOT, 0, self.sys)
        self.pool = PageTablePool(self.sys.u64, 0, pool_start, sys_size)
        self.n_vcpus = vcpus
        self.mmio = mmio or (lambda gpa, is_write, value: gpa)
        self.mmio_exits = 0
        self._hashes: list[hashlib._Hash] = []
        self._pages: list[np.ndarray] = []

    # ---- address spaces ------------------------------------------------------------------

    def new_address_space(self) -> AddressSpace:
        """A fresh page-table tree with the system memslot identity-mapped (4K pages)."""
        aspace = AddressSpace(self.pool)
        aspace.map(0, 0, self.sys.size)
        return aspace

    def set_cr3(self, vcpu: Vcpu, aspace: AddressSpace) -> None:
        """Load another tree through KVM_SET_SREGS (CPL3 cannot ``mov cr3``): a root switch."""
        sregs = vcpu.get_sregs()
        sregs.cr3 = aspace.cr3
        vcpu.set_sregs(sregs)
        self._hashes[vcpu.id].update(b"cr3" + aspace.cr3.to_bytes(8, "little"))

    # ---- vCPUs ---------------------------------------------------------------------------

    def add_vcpu(self, aspace: AddressSpace) -> Vcpu:
        """A vCPU in 64-bit mode at CPL3 (IOPL 3 so ``out`` works), about to run the interpreter."""
        vcpu = self.vm.create_vcpu()
        if vcpu.id >= self.n_vcpus:
            raise ValueError(f"Guest was sized for {self.n_vcpus} vCPUs")
        sregs = vcpu.get_sregs()
        sregs.cs = _user_segment(USER_CS, code=True)
        sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = _user_segment(USER_DS, code=False)
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_WP | X86_CR0_PG
        sregs.cr4 = X86_CR4_PAE
        sregs.efer = EFER_LME | EFER_LMA | EFER_NX
        sregs.cr3 = aspace.cr3
        vcpu.set_sregs(sregs)
        regs = uapi.kvm_regs(rip=CODE_GPA, rflags=X86_EFLAGS_FIXED | X86_EFLAGS_IOPL3,
                             r15=CMD_GPA + vcpu.id * CMD_BYTES)
        vcpu.set_regs(regs)
        self._hashes.append(hashlib.sha256())
        return vcpu

    # ---- running -------------------------------------------------------------------------

    def run(self, vcpu: Vcpu, cmds: np.ndarray) -> None:
        """Execute ``cmds`` (``COMMAND`` records) on ``vcpu``, one buffer-full per KVM_RUN batch.

        The digest takes the commands as planned; afterwards each read's ``value`` holds what the
        guest loaded.
        """
        self._hashes[vcpu.id].update(cmds.tobytes())
        self._pages.append(cmds["addr"] >> np.uint64(12))
        base = CMD_GPA + vcpu.id * CMD_BYTES
        buf = self.sys.u8[base:base + CMD_BYTES].view(COMMAND)
        per_batch = CMD_CAPACITY - 1
        for start in range(0, len(cmds), per_batch):
            chunk = cmds[start:start + per_batch]
            buf[:len(chunk)] = chunk
            buf[len(chunk)] = (OP_END, 0, 0)
            self._run_batch(vcpu)
            chunk["value"] = buf["value"][:len(chunk)]

    def _run_batch(self, vcpu: Vcpu) -> None:
        """KVM_RUN until the guest's ``out`` to BATCH_PORT, answering MMIO exits on the way."""
        while True:
            reason = vcpu.run()
            if reason is KvmExit.IO and vcpu.run_page.exit.io.port == BATCH_PORT:
                return
            if reason is KvmExit.MMIO:
                self._complete_mmio(vcpu)
            elif reason is not KvmExit.INTR:
                raise GuestCrash(f"vCPU {vcpu.id}: unexpected KVM_EXIT_{reason.name}; {vcpu.describe()}")

    def _complete_mmio(self, vcpu: Vcpu) -> None:
        """Give the emulator the read value (little-endian, ``len`` bytes) or take the written one."""
        mmio = vcpu.run_page.exit.mmio
        self.mmio_exits += 1
        written = int.from_bytes(bytes(mmio.data[:mmio.len]), "little") if mmio.is_write else 0
        value = self.mmio(mmio.phys_addr, bool(mmio.is_write), written)
        if not mmio.is_write:
            data = (value & ((1 << (8 * mmio.len)) - 1)).to_bytes(mmio.len, "little")
            for i, byte in enumerate(data):
                mmio.data[i] = byte

    # ---- results -------------------------------------------------------------------------

    @property
    def exits(self) -> int:
        return sum(vcpu.exits for vcpu in self.vm.vcpus)

    @property
    def pages_touched(self) -> int:
        """Distinct guest pages the commands addressed (data and MMIO alike)."""
        return int(len(np.unique(np.concatenate(self._pages)))) if self._pages else 0

    @property
    def accesses_digest(self) -> str:
        return hashlib.sha256(b"".join(h.digest() for h in self._hashes)).hexdigest()

    def close(self) -> None:
        self.vm.close()
        self.sys.close()

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

