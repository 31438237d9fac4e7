"""Host facts that recording depends on and that a trace must carry: kernel, KVM backend, parameters.

``mmutrace doctor`` shows them, the recorder stores ``host_metadata()`` in every trace file, and
replay reads them back to pick a model configuration (``tdp_mmu``; a run with a non-upstream
parameter set is its own configuration).  Everything is read from /sys and uname: no shelling out.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SYS_MODULE = Path("/sys/module")
BTF_VMLINUX = Path("/sys/kernel/btf/vmlinux")
#: Where ``./run.sh setup`` builds a header tree for bcc when the kernel ships no build directory.
HEADER_CACHE = Path("/var/cache/mmutrace")

#: KVM vendor modules, in the order they are looked for (one is loaded at a time).
KVM_VENDOR_MODULES = ("kvm_intel", "kvm_amd", "kvm_pvm")
#: Vendor modules that are not part of upstream Linux: all their parameters are non-upstream too.
NON_UPSTREAM_VENDOR_MODULES = frozenset({"kvm_pvm"})

#: kvm.ko parameters that upstream kernels 6.1-6.18 define (virt/kvm/kvm_main.c, arch/x86/kvm/x86.c,
#: mmu/mmu.c, mmu/spte.c).  Anything else in /sys/module/kvm/parameters comes from a patched kernel
#: (this PVM host adds the mmu_lock_* family, eager_zap_unsync_children, ...): doctor flags it and a
#: trace records it, because its effect on MMU decisions is not modelled.
UPSTREAM_KVM_PARAMS = frozenset({
    # virt/kvm/kvm_main.c
    "halt_poll_ns", "halt_poll_ns_grow", "halt_poll_ns_grow_start", "halt_poll_ns_shrink",
    "enable_virt_at_load", "allow_unsafe_mappings",
    # arch/x86/kvm/x86.c
    "ignore_msrs", "report_ignored_msrs", "min_timer_period_us", "kvmclock_periodic_sync", "tsc_tolerance_ppm",
    "lapic_timer_advance", "lapic_timer_advance_ns", "vector_hashing", "enable_vmware_backdoor",
    "force_emulation_prefix", "pi_inject_timer", "enable_pmu", "eager_page_split", "mitigate_smt_rsb",
    # arch/x86/kvm/mmu/mmu.c, spte.c
    "nx_huge_pages", "nx_huge_pages_recovery_ratio", "nx_huge_pages_recovery_period_ms", "flush_on_reuse",
    "tdp_mmu", "mmio_caching",
})
#: The kvm.ko parameters that change MMU decisions in upstream code (shown first by doctor).
MMU_PARAMS = ("tdp_mmu", "eager_page_split", "mmio_caching", "nx_huge_pages", "flush_on_reuse")


@dataclass(frozen=True)
class ModuleParam:
    """One /sys/module/<module>/parameters/<name> value (None when the file is not readable)."""

    module: str
    name: str
    value: str | None
    upstream: bool


def kernel_release() -> str:
    return os.uname().release


def kvm_vendor_module() -> str | None:
    """The loaded KVM vendor module (kvm_intel, kvm_amd, kvm_pvm), or None."""
    return next((m for m in KVM_VENDOR_MODULES if (SYS_MODULE / m).is_dir()), None)


def module_params(module: str) -> dict[str, str | None]:
    """Every parameter of ``module`` as the text /sys shows (Y/N, numbers); None when unreadable."""
    params: dict[str, str | None] = {}
    pdir = SYS_MODULE / module / "parameters"
    for path in sorted(pdir.iterdir()) if pdir.is_dir() else ():
        try:
            params[path.name] = path.read_text().strip()
        except OSError:  # write-only parameters (mode 0200) exist
            params[path.name] = None
    return params


def kvm_params() -> list[ModuleParam]:
    """kvm.ko's and the vendor module's parameters, each marked upstream or not."""
    out = [ModuleParam("kvm", k, v, k in UPSTREAM_KVM_PARAMS) for k, v in module_params("kvm").items()]
    vendor = kvm_vendor_module()
    if vendor:
        upstream = vendor not in NON_UPSTREAM_VENDOR_MODULES
        out += [ModuleParam(vendor, k, v, upstream) for k, v in module_params(vendor).items()]
    return out


def param_bool(value: str | None) -> bool | None:
    """A bool module parameter's text (Y/N, 1/0) as a bool; None when absent or not a bool."""
    return {"Y": True, "N": False, "1": True, "0": False}.get((value or "").strip())


def btf_present() -> bool:
    """Whether the running kernel exposes its BTF (the recorder resolves struct offsets from it)."""
    return BTF_VMLINUX.is_file()


def bcc_kernel_source(release: str | None = None) -> Path | None:
    """The header tree bcc should compile against: the kernel's own build directory when it has
    one, else the tree ``./run.sh setup`` builds under /var/cache/mmutrace; None when neither exists."""
    release = release or kernel_release()
    build = Path("/lib/modules") / release / "build"
    cached = HEADER_CACHE / f"headers-{release}"
    return next((tree for tree in (build, cached) if (tree / "include").is_dir()), None)


def bcc_environment() -> dict[str, str]:
    """os.environ plus BCC_KERNEL_SOURCE when the kernel has no build directory and a header tree
    exists (a BCC_KERNEL_SOURCE already set is kept).  The recorder applies it to itself with
    ``os.environ.update(bcc_environment())`` before bcc compiles; doctor passes it to a child."""
    env = dict(os.environ)
    source = bcc_kernel_source()
    if source is not None and source.name != "build":
        env.setdefault("BCC_KERNEL_SOURCE", str(source))
    return env


#: /proc/self/pagemap: bits 0-54 of an entry are the pfn (zeroed unless the reader has CAP_SYS_ADMIN).
PAGEMAP_PFN_MASK = (1 << 55) - 1


def zero_pfn() -> int | None:
    """The pfn of the host's shared zero page, which a read fault on untouched anonymous memory maps.

    Replay needs it where the trace lacks ``fault->map_writable`` (tracefs captures): a read fault
    that got the zero page is not host-writable, any other pfn of private anonymous memory is.
    None when pagemap hides pfns (it shows 0 to a reader without CAP_SYS_ADMIN).
    """
    page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        cell = ctypes.c_char.from_buffer(page)
        try:
            untouched = cell.value == b"\0"  # this read is what maps the zero page
            with open("/proc/self/pagemap", "rb") as pagemap:
                pagemap.seek(ctypes.addressof(cell) // mmap.PAGESIZE * 8)
                pfn = struct.unpack("<Q", pagemap.read(8))[0] & PAGEMAP_PFN_MASK
        finally:
            del cell
    except OSError:
        return None
    finally:
        page.close()
    return pfn if untouched and pfn else None


def host_metadata() -> dict[str, Any]:
    """The host facts a trace file stores (schema.METADATA_KEYS: kernel_release, kvm_backend,
    kvm_params, vendor_params, tdp_mmu, zero_pfn), plus which of those parameters are not upstream."""
    kvm = module_params("kvm")
    vendor = kvm_vendor_module()
    params = kvm_params()
    return {
        "kernel_release": kernel_release(),
        "kvm_backend": vendor,
        "kvm_params": kvm,
        "vendor_params": module_params(vendor) if vendor else {},
        "tdp_mmu": param_bool(kvm.get("tdp_mmu")),
        "non_upstream_params": [f"{p.module}.{p.name}" for p in params if not p.upstream],
        "zero_pfn": zero_pfn(),
    }
