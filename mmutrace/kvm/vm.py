"""A KVM VM file descriptor: memslots, dirty log, the MMU-page quota, vCPU creation.

Method names follow the ioctls (``KVM_SET_USER_MEMORY_REGION`` → ``set_user_memory_region``) so the
kernel handler a scenario drives is one grep away.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from mmutrace.errors import HostError
from mmutrace.kvm import uapi
from mmutrace.kvm.libc import ioctl
from mmutrace.kvm.memory import PAGE_SIZE, HostMemory
from mmutrace.kvm.vcpu import Vcpu

KVM_DEV = "/dev/kvm"


def open_kvm() -> int:
    """Open /dev/kvm, raising HostError with the reason (not root, absent, wrong API)."""
    if os.geteuid() != 0:
        raise HostError("running KVM guests needs root (open /dev/kvm, write trace_marker)")
    if not os.path.exists(KVM_DEV):
        raise HostError(f"{KVM_DEV} does not exist: load a KVM module (kvm_intel, kvm_amd or kvm_pvm)")
    try:
        fd = os.open(KVM_DEV, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise HostError(f"cannot open {KVM_DEV}: {exc.strerror}") from None
    version = ioctl(fd, uapi.KVM_GET_API_VERSION, what="KVM_GET_API_VERSION")
    if version != uapi.KVM_API_VERSION:
        os.close(fd)
        raise HostError(f"KVM API version {version}, expected {uapi.KVM_API_VERSION}")
    return fd


@dataclass
class Memslot:
    """One ``kvm_userspace_memory_region`` as the VM currently has it."""

    slot: int
    gpa: int
    size: int
    memory: HostMemory
    offset: int  # into ``memory``
    flags: int

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE


class Vm:
    """A VM: ``KVM_CREATE_VM`` plus the VM ioctls the scenarios drive."""

    def __init__(self) -> None:
        self.kvm_fd = open_kvm()
        self.fd = ioctl(self.kvm_fd, uapi.KVM_CREATE_VM, 0, what="KVM_CREATE_VM")
        self.vcpu_mmap_size = ioctl(self.kvm_fd, uapi.KVM_GET_VCPU_MMAP_SIZE, what="KVM_GET_VCPU_MMAP_SIZE")
        self.memslots: dict[int, Memslot] = {}
        self.vcpus: list[Vcpu] = []

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd (per-VM answers), 0 when unsupported."""
        return ioctl(self.fd, uapi.KVM_CHECK_EXTENSION, cap, what="KVM_CHECK_EXTENSION")

    def enable_cap(self, cap: int, *args: int) -> None:
        req = uapi.kvm_enable_cap(cap=cap)
        for i, arg in enumerate(args):
            req.args[i] = arg
        ioctl(self.fd, uapi.KVM_ENABLE_CAP, req, what=f"KVM_ENABLE_CAP({cap})")

    def set_user_memory_region(self, slot: int, gpa: int, memory: HostMemory, offset: int = 0,
                               size: int | None = None, flags: int = 0) -> Memslot:
        """Create, move or change the flags of ``slot`` (the kernel tells which from the old slot)."""
        size = memory.size - offset if size is None else size
        region = uapi.kvm_userspace_memory_region(slot=slot, flags=flags, guest_phys_addr=gpa,
                                                  memory_size=size, userspace_addr=memory.hva + offset)
        ioctl(self.fd, uapi.KVM_SET_USER_MEMORY_REGION, region, what=f"KVM_SET_USER_MEMORY_REGION(slot {slot})")
        self.memslots[slot] = Memslot(slot, gpa, size, memory, offset, flags)
        return self.memslots[slot]

    def delete_memslot(self, slot: int) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` with size 0: the slot goes, its SPTEs with it."""
        old = self.memslots.pop(slot)
        region = uapi.kvm_userspace_memory_region(slot=slot, flags=0, guest_phys_addr=old.gpa,
                                                  memory_size=0, userspace_addr=old.memory.hva + old.offset)
        ioctl(self.fd, uapi.KVM_SET_USER_MEMORY_REGION, region, what=f"KVM_SET_USER_MEMORY_REGION(delete slot {slot})")

    def get_dirty_log(self, slot: int) -> np.ndarray:
        """``KVM_GET_DIRTY_LOG``: the slot's dirty bitmap as a bool array, one entry per page."""
        npages = self.memslots[slot].npages
        bitmap = np.zeros(-(-npages // 64), dtype=np.uint64)
        req = uapi.kvm_dirty_log(slot=slot, dirty_bitmap=bitmap.ctypes.data)
        ioctl(self.fd, uapi.KVM_GET_DIRTY_LOG, req, what=f"KVM_GET_DIRTY_LOG(slot {slot})")
        return np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:npages].astype(bool)

    def clear_dirty_log(self, slot: int, dirty: np.ndarray, first_page: int = 0) -> np.ndarray:
        """``KVM_CLEAR_DIRTY_LOG`` of pages [first_page, first_page + len(dirty)) (first_page a
        multiple of 64): re-protect the pages set in ``dirty``.  Returns the mask as passed, 64-bit words."""
        bitmap = np.packbits(dirty.astype(np.uint8), bitorder="little")
        bitmap = np.concatenate([bitmap, np.zeros(-len(bitmap) % 8, np.uint8)])
        req = uapi.kvm_clear_dirty_log(slot=slot, num_pages=len(dirty), first_page=first_page,
                                       dirty_bitmap=bitmap.ctypes.data)
        ioctl(self.fd, uapi.KVM_CLEAR_DIRTY_LOG, req, what=f"KVM_CLEAR_DIRTY_LOG(slot {slot})")
        return bitmap.view(np.uint64)

    def set_nr_mmu_pages(self, goal: int) -> None:
        """``KVM_SET_NR_MMU_PAGES``: cap the shadow pages (kernel minimum 64, smaller is EINVAL)."""
        ioctl(self.fd, uapi.KVM_SET_NR_MMU_PAGES, goal, what=f"KVM_SET_NR_MMU_PAGES({goal})")

    def create_vcpu(self) -> Vcpu:
        vcpu = Vcpu(self, len(self.vcpus))
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        """Close vCPUs then the VM: the kernel tears the MMU down on the last reference."""
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        for fd in (self.fd, self.kvm_fd):
            os.close(fd)
        self.fd = self.kvm_fd = -1

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

