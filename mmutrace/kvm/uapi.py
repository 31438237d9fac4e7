"""The slice of <linux/kvm.h> (x86) the harness uses: ioctl numbers, exit reasons and structs.

Layouts are the x86-64 uapi ones; sizes are asserted below so a typo fails at import, not as an
EINVAL from the kernel.  Names keep the uapi spelling so grep finds the C twin.
"""

from __future__ import annotations

import ctypes
import enum

KVMIO = 0xAE

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct))


def _ior(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct))


def _iowr(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(struct))


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


class kvm_dirty_log(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("padding1", ctypes.c_uint32), ("dirty_bitmap", ctypes.c_void_p)]


class kvm_clear_dirty_log(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("num_pages", ctypes.c_uint32),
        ("first_page", ctypes.c_uint64),
        ("dirty_bitmap", ctypes.c_void_p),
    ]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [
        ("cap", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("args", ctypes.c_uint64 * 4),
        ("pad", ctypes.c_uint8 * 64),
    ]


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16), ("padding", ctypes.c_uint16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        ("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment), ("fs", kvm_segment),
        ("gs", kvm_segment), ("ss", kvm_segment), ("tr", kvm_segment), ("ldt", kvm_segment),
        ("gdt", kvm_dtable), ("idt", kvm_dtable),
        ("cr0", ctypes.c_uint64), ("cr2", ctypes.c_uint64), ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64), ("cr8", ctypes.c_uint64), ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * 4),
    ]


class kvm_run_io(ctypes.Structure):
    _fields_ = [
        ("direction", ctypes.c_uint8),
        ("size", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("count", ctypes.c_uint32),
        ("data_offset", ctypes.c_uint64),
    ]


class kvm_run_mmio(ctypes.Structure):
    _fields_ = [
        ("phys_addr", ctypes.c_uint64),
        ("data", ctypes.c_uint8 * 8),
        ("len", ctypes.c_uint32),
        ("is_write", ctypes.c_uint8),
    ]


class kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", ctypes.c_uint32), ("ndata", ctypes.c_uint32), ("data", ctypes.c_uint64 * 16)]


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", ctypes.c_uint64), ("cpu", ctypes.c_uint32)]


class kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("internal", kvm_run_internal),
        ("fail_entry", kvm_run_fail_entry),
        ("padding", ctypes.c_char * 256),
    ]


class kvm_run(ctypes.Structure):
    """The head of the shared ``struct kvm_run`` page (the rest is not used here)."""

    _fields_ = [
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("exit", kvm_run_exit),
    ]


assert ctypes.sizeof(kvm_userspace_memory_region) == 32
assert ctypes.sizeof(kvm_enable_cap) == 104
assert ctypes.sizeof(kvm_regs) == 144
assert ctypes.sizeof(kvm_sregs) == 312
assert kvm_run.exit.offset == 32

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, kvm_dirty_log)
KVM_SET_NR_MMU_PAGES = _io(0x44)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, kvm_userspace_memory_region)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, kvm_regs)
KVM_SET_REGS = _iow(0x82, kvm_regs)
KVM_GET_SREGS = _ior(0x83, kvm_sregs)
KVM_SET_SREGS = _iow(0x84, kvm_sregs)
KVM_ENABLE_CAP = _iow(0xA3, kvm_enable_cap)
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, kvm_clear_dirty_log)

KVM_API_VERSION = 12
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
#: A write lookup of such a slot's hva fails (KVM_HVA_ERR_RO_BAD).
KVM_MEM_READONLY = 1 << 1

KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
#: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 argument bit: GET_DIRTY_LOG no longer write-protects.
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
#: ...and every page starts dirty, so enabling dirty logging write-protects nothing.
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1


class KvmExit(enum.IntEnum):
    """``KVM_EXIT_*`` reasons in ``kvm_run.exit_reason`` (the ones this harness can meet)."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    INTERNAL_ERROR = 17
