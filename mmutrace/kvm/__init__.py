"""A small KVM userspace in Python (ioctls on /dev/kvm through ctypes; no QEMU).

It runs one program, a command-buffer interpreter, at CPL3 in 64-bit long mode: on a PVM host, CPL0
guest code is emulated and makes no shadow pages, while CPL3 code runs natively and faults through
the shadow MMU.  ``Guest`` is the entry point; ``Vm``/``Vcpu`` are the raw ioctl wrappers.
"""

from mmutrace.kvm import uapi
from mmutrace.kvm.guest import Guest
from mmutrace.kvm.interpreter import OP_READ, OP_WRITE, commands
from mmutrace.kvm.memory import HUGE_PAGE_SIZE, PAGE_SIZE, HostMemory
from mmutrace.kvm.paging import AddressSpace
from mmutrace.kvm.vcpu import GuestCrash, Vcpu
from mmutrace.kvm.vm import Vm

__all__ = ["AddressSpace", "Guest", "GuestCrash", "HUGE_PAGE_SIZE", "HostMemory", "OP_READ",
           "OP_WRITE", "PAGE_SIZE", "Vcpu", "Vm", "commands", "uapi"]
