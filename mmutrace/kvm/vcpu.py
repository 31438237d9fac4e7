"""A vCPU file descriptor: registers, the shared ``kvm_run`` page and ``KVM_RUN``."""

from __future__ import annotations

import errno
import os
import threading
from typing import TYPE_CHECKING

from mmutrace.errors import MmutraceError
from mmutrace.kvm import libc, uapi
from mmutrace.kvm.uapi import KvmExit

if TYPE_CHECKING:
    from mmutrace.kvm.vm import Vm


class GuestCrash(MmutraceError):
    """The guest stopped in a way the harness cannot continue from (shutdown, failed entry...)."""


class Vcpu:
    """One vCPU: ``KVM_CREATE_VCPU`` and its mmap'd ``struct kvm_run``."""

    def __init__(self, vm: "Vm", vcpu_id: int) -> None:
        self.id = vcpu_id
        self.fd = libc.ioctl(vm.fd, uapi.KVM_CREATE_VCPU, vcpu_id, what=f"KVM_CREATE_VCPU({vcpu_id})")
        self._run_len = vm.vcpu_mmap_size
        self._run_addr = libc.mmap(self._run_len, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, self.fd,
                                   what="mmap(vcpu kvm_run)")
        self.run_page = uapi.kvm_run.from_address(self._run_addr)
        self.exits = 0  # KVM_RUN returns, i.e. exits to userspace
        self.tid = 0  # host thread id that last ran it: the tid of its trace events

    def get_regs(self) -> uapi.kvm_regs:
        regs = uapi.kvm_regs()
        libc.ioctl(self.fd, uapi.KVM_GET_REGS, regs, what="KVM_GET_REGS")
        return regs

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        libc.ioctl(self.fd, uapi.KVM_SET_REGS, regs, what="KVM_SET_REGS")

    def get_sregs(self) -> uapi.kvm_sregs:
        sregs = uapi.kvm_sregs()
        libc.ioctl(self.fd, uapi.KVM_GET_SREGS, sregs, what="KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        libc.ioctl(self.fd, uapi.KVM_SET_SREGS, sregs, what="KVM_SET_SREGS")

    def run(self) -> KvmExit:
        """One ``KVM_RUN``; returns the exit reason, raising GuestCrash for the fatal ones.

        EINTR (a host signal) is reported as ``KvmExit.INTR`` so the caller simply re-enters.
        """
        self.tid = threading.get_native_id()
        try:
            libc.ioctl(self.fd, uapi.KVM_RUN, None, what="KVM_RUN")
        except libc.SyscallError as exc:
            if exc.errno == errno.EINTR:
                return KvmExit.INTR
            raise
        self.exits += 1
        reason = self.run_page.exit_reason
        try:
            reason = KvmExit(reason)
        except ValueError:
            raise GuestCrash(f"vCPU {self.id}: unexpected exit reason {reason}; {self.describe()}") from None
        if reason in (KvmExit.SHUTDOWN, KvmExit.FAIL_ENTRY, KvmExit.INTERNAL_ERROR, KvmExit.UNKNOWN,
                      KvmExit.EXCEPTION):
            raise GuestCrash(f"vCPU {self.id}: KVM_EXIT_{reason.name}{self._exit_detail(reason)}; {self.describe()}")
        return reason

    def _exit_detail(self, reason: KvmExit) -> str:
        ex = self.run_page.exit
        if reason is KvmExit.INTERNAL_ERROR:
            data = " ".join(f"{ex.internal.data[i]:#x}" for i in range(min(ex.internal.ndata, 16)))
            return f" (suberror {ex.internal.suberror}, data {data})"
        if reason is KvmExit.FAIL_ENTRY:
            return f" (hardware reason {ex.fail_entry.hardware_entry_failure_reason:#x})"
        return ""

    def describe(self) -> str:
        """Registers in one line, for error messages."""
        regs, sregs = self.get_regs(), self.get_sregs()
        gprs = " ".join(f"{name}={getattr(regs, name):#x}" for name, _ in uapi.kvm_regs._fields_)
        return (f"{gprs} cr0={sregs.cr0:#x} cr2={sregs.cr2:#x} cr3={sregs.cr3:#x} cr4={sregs.cr4:#x} "
                f"efer={sregs.efer:#x} cs={sregs.cs.selector:#x}/dpl{sregs.cs.dpl}")

    def close(self) -> None:
        if self.fd >= 0:
            del self.run_page
            libc.munmap(self._run_addr, self._run_len)
            os.close(self.fd)
            self.fd = -1
