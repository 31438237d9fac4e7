"""Compile mmu_events.bpf.c with this kernel's struct layout, attach it, and read its counters.

The C names every kernel struct member it reads as ``OFF_<struct>__<member>`` (nested members
joined by ``__``); the loader resolves each from the running kernel's BTF and prepends the
``#define``s, so no offset ever comes from a header.  Before compiling it checks every raw
tracepoint's prototype against ``RAW_PROTOS`` (the argument list the C was written for) and refuses
to start, naming the event or member, when the kernel differs.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

from mmutrace import hostinfo, schema
from mmutrace.errors import HostError
from probes import btf
from probes.layout import NR_SLOTS, RECORD_DTYPE, RINGS, SMALL_SLOTS, is_small

SOURCE = Path(__file__).with_name("mmu_events.bpf.c")
#: Each ring, 128 MiB: 1M full records, 2M small ones; with ~80% of a faulting guest's events small,
#: one vCPU at full speed (~1.5M events/s) fills the small ring in ~1.7 s if the consumer stalls.
RINGBUF_PAGES = 1 << 15

#: TP_PROTO of each raw tracepoint the C attaches, as the C reads ``ctx->args[]``.
RAW_PROTOS: dict[str, list[str]] = {
    "kvm_mmu_pagetable_walk": ["u64", "u32"],
    "kvm_mmu_paging_element": ["u64", "int"],
    "kvm_mmu_set_accessed_bit": ["long unsigned int", "unsigned int", "unsigned int"],
    "kvm_mmu_set_dirty_bit": ["long unsigned int", "unsigned int", "unsigned int"],
    "kvm_mmu_walker_error": ["u32"],
    "kvm_mmu_get_page": ["struct kvm_mmu_page *", "bool"],
    "kvm_mmu_sync_page": ["struct kvm_mmu_page *"],
    "kvm_mmu_unsync_page": ["struct kvm_mmu_page *"],
    "kvm_mmu_prepare_zap_page": ["struct kvm_mmu_page *"],
    "kvm_mmu_zap_all_fast": ["struct kvm *"],
    "kvm_mmu_spte_requested": ["struct kvm_page_fault *"],
    "kvm_mmu_set_spte": ["int", "gfn_t", "u64 *"],
    "kvm_mmu_split_huge_page": ["u64", "u64", "int", "int"],
    "kvm_tdp_mmu_spte_changed": ["int", "gfn_t", "int", "u64", "u64"],
    "fast_page_fault": ["struct kvm_vcpu *", "struct kvm_page_fault *", "u64 *", "u64", "int"],
    "mark_mmio_spte": ["u64 *", "gfn_t", "u64"],
    "handle_mmio_page_fault": ["u64", "gfn_t", "unsigned int"],
    "check_mmio_spte": ["u64", "unsigned int", "unsigned int"],
    "kvm_page_fault": ["struct kvm_vcpu *", "u64", "u64"],
    "kvm_entry": ["struct kvm_vcpu *", "bool"],
    "kvm_unmap_hva_range": ["long unsigned int", "long unsigned int"],
    "kvm_age_hva": ["long unsigned int", "long unsigned int"],
    "kvm_test_age_hva": ["long unsigned int"],
    "kvm_mmio": ["int", "int", "u64", "void *"],
    "kvm_pio": ["unsigned int", "unsigned int", "unsigned int", "unsigned int", "void *"],
    "kvm_userspace_exit": ["__u32", "int"],
}
#: Events recorded through formatted tracepoints (their fields come from vendor callbacks).
FORMATTED = {"kvm_exit": "tracepoint:kvm:kvm_exit"}
IOCTL_PROBES = ("tracepoint:syscalls:sys_enter_ioctl", "tracepoint:syscalls:sys_exit_ioctl")
#: Attached whatever the selection: they learn which VM and vCPU a thread runs (KVM_RUN, kvm_entry).
ALWAYS_ATTACHED = ("raw_tracepoint:kvm_entry", IOCTL_PROBES[0])

#: A struct member path in the C: ``F(ptr, kvm__arch__n_used_mmu_pages)`` or ``OFF_kvm_vcpu__arch__regs``.
_MEMBER_RE = re.compile(r"\b(?:OFF_)?([a-z][a-z0-9_]*?__[a-z0-9_]+)\b")


def kernel_source() -> Path:
    """The header tree bcc compiles against (mmutrace.hostinfo); HostError when there is none."""
    source = hostinfo.bcc_kernel_source()
    if source is None:
        raise HostError(f"no kernel headers for bcc (/lib/modules/{hostinfo.kernel_release()}/build or "
                        f"{hostinfo.HEADER_CACHE}/headers-{hostinfo.kernel_release()}); run ./run.sh setup")
    return source


def probe_name(event: str) -> str:
    """How metadata names the probe that records ``event``."""
    if event in FORMATTED:
        return FORMATTED[event]
    if event.startswith("ioctl_"):
        return IOCTL_PROBES[event == "ioctl_ret"]
    return f"raw_tracepoint:{event}"


def check_prototypes(kernel: btf.Btf, events: list[str]) -> None:
    """Refuse a kernel whose tracepoint arguments differ from what the C reads."""
    for event in events:
        want = RAW_PROTOS.get(event)
        if want is None:
            continue
        have = kernel.tracepoint_args(event)
        if have != want:
            raise HostError(f"tracepoint {event} has arguments ({', '.join(have)}) on this kernel; "
                            f"the probe reads ({', '.join(want)})")


def program_text(events: list[str], filtered: bool, kernel: btf.Btf | None = None) -> str:
    """The C with its ``#define`` prologue: layout from BTF, event ids, the selection and filter."""
    kernel = kernel or btf.vmlinux()
    body = SOURCE.read_text()
    lines = [f"#define NR_SLOTS {NR_SLOTS}", f"#define SMALL_SLOTS {SMALL_SLOTS}",
             f"#define NR_EVENTS {len(schema.EVENTS)}", f"#define RINGBUF_PAGES {RINGBUF_PAGES}",
             f"#define FILTER {int(filtered)}"]
    for i, kind in enumerate(schema.EVENTS):
        lines += [f"#define EV_{kind.name} {i}", f"#define WANT_{kind.name} {int(kind.name in events)}",
                  f"#define SMALL_{kind.name} {int(is_small(kind.name))}"]
    members = {name: kernel.member(name.replace("__", ".")) for name in sorted(set(_MEMBER_RE.findall(body)))}
    for name, member in members.items():
        lines += [f"#define OFF_{name} {member.offset}", f"#define SZ_{name} {member.size}"]
    lines += span_defines(members)
    return "\n".join(lines) + "\n\n" + body


def span_defines(members: dict[str, btf.Member]) -> list[str]:
    """Per struct, the 8-aligned span of the members the C names (``SPAN_LO_``/``SPAN_SIZE_<struct>``)
    and each member's offset in it (``SPAN_OFF_<member>``): a probe reads that span with one
    ``bpf_probe_read_kernel`` (SPAN_READ) instead of one read per member."""
    by_struct: dict[str, list[str]] = {}
    for name in members:
        by_struct.setdefault(name.split("__", 1)[0], []).append(name)
    lines = []
    for struct, names in sorted(by_struct.items()):
        lo = min(members[n].offset for n in names) & ~7
        hi = max(members[n].offset + members[n].size for n in names)
        lines += [f"#define SPAN_LO_{struct} {lo}", f"#define SPAN_SIZE_{struct} {(hi - lo + 7) & ~7}"]
        lines += [f"#define SPAN_OFF_{n} {members[n].offset - lo}" for n in names]
    return lines


class MmuProbes:
    """The compiled and attached program: its ring buffer fd and its per-CPU counters.

    ``targets`` are tgids to record (their children and the VMs they own too); None records every
    process on the host.
    """

    def __init__(self, events: list[str], targets: list[int] | None) -> None:
        kernel = btf.vmlinux()
        check_prototypes(kernel, events + ["kvm_entry"])
        text = program_text(events, targets is not None, kernel)
        kernel_source()
        os.environ.update(hostinfo.bcc_environment())
        try:
            from bcc import BPF
        except ImportError:
            raise HostError("bcc is not importable (Debian python3-bpfcc; run ./run.sh setup)") from None
        try:
            self.bpf = BPF(text=text.encode(), cflags=["-w"])
        except Exception as exc:  # bcc raises bare Exception for compile and attach failures
            raise HostError(f"cannot load the BPF probes: {str(exc).splitlines()[0]}") from None
        self.events = list(events)
        self.probes = sorted({probe_name(e) for e in events} | set(ALWAYS_ATTACHED)
                             | ({"raw_tracepoint:kvm_mmu_get_page"} if "kvm_mmu_set_spte" in events else set())
                             | ({"tracepoint:sched:sched_process_fork"} if targets is not None else set()))
        for pid in targets or []:
            self.add_target(pid)

    @property
    def ring_fds(self) -> dict[str, int]:
        """Each ring buffer map's fd, by name (probes.layout.RINGS)."""
        return {name: self.bpf[name.encode()].map_fd for name in RINGS}

    def add_target(self, tgid: int) -> None:
        table = self.bpf[b"targets"]
        table[table.Key(tgid)] = table.Leaf(1)

    def _stats(self) -> list:
        """Each CPU's ``struct cpu_stats``."""
        return list(self.bpf[b"stats"][ctypes.c_int(0)])

    def lost(self) -> dict[str, int]:
        """Reserve failures per CPU (the ring buffer was full)."""
        return {str(cpu): int(st.lost) for cpu, st in enumerate(self._stats())}

    def hits(self) -> dict[str, int]:
        """How often each wanted event's probe fired for a recorded process, all CPUs."""
        per_cpu = self._stats()
        return {kind.name: sum(int(st.hits[i]) for st in per_cpu) for i, kind in enumerate(schema.EVENTS)
                if kind.name in self.events}

    def close(self) -> None:
        self.bpf.cleanup()


__all__ = ["MmuProbes", "RECORD_DTYPE", "RINGBUF_PAGES", "kernel_source", "probe_name", "program_text"]
