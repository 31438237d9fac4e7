"""`mmutrace doctor`: what recording and replay need from this host, each with its fix.

One ``Check`` per requirement, in the order a new user meets them.  A check is ``ok``, ``missing``
(recording cannot work: doctor exits non-zero) or ``warning`` (recording works, but something is
worth knowing: a non-upstream KVM parameter whose decisions the models do not know, an event this
kernel lacks).  Every fact comes from the running host; nothing is assumed from the kernel version.
"""

from __future__ import annotations

import enum
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from mmutrace import hostinfo, tracefs
from mmutrace.errors import HostError
from mmutrace.schema import EVENTS, TRACEFS_GROUPS

#: The smallest program that proves bcc can compile (against the header tree), load and attach a
#: raw tracepoint, which is what the recorder does.
BCC_PROBE_PROGRAM = "RAW_TRACEPOINT_PROBE(sys_enter) { return 0; }"
BCC_PROBE_TIMEOUT_S = 120


class Status(enum.Enum):
    OK = "ok"
    MISSING = "missing"
    WARNING = "warning"


@dataclass(frozen=True)
class Check:
    """One row of the doctor table."""

    name: str
    status: Status
    detail: str
    fix: str = ""
    required: bool = True  # a missing required check means recording cannot work

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status.value}


def check_root() -> Check:
    if os.geteuid() == 0:
        return Check("root", Status.OK, "running as root")
    return Check("root", Status.MISSING, f"running as uid {os.geteuid()}",
                 "run as root: BPF programs, tracefs instances and /dev/kvm need it")


def check_dev_kvm() -> Check:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return Check("/dev/kvm", Status.MISSING, f"cannot open /dev/kvm: {exc.strerror}",
                     "load the KVM vendor module (modprobe kvm_intel or kvm_amd) and run as root")
    os.close(fd)
    return Check("/dev/kvm", Status.OK, "opens read-write")


def check_vendor_module() -> Check:
    vendor = hostinfo.kvm_vendor_module()
    if vendor is None:
        return Check("KVM vendor module", Status.MISSING,
                     f"none of {', '.join(hostinfo.KVM_VENDOR_MODULES)} is loaded", "modprobe kvm_intel (or kvm_amd)")
    if vendor in hostinfo.NON_UPSTREAM_VENDOR_MODULES:
        return Check("KVM vendor module", Status.WARNING, f"{vendor} (not an upstream module: shadow paging on a "
                     "host without hardware virtualization; its own paths are not modelled)", required=False)
    return Check("KVM vendor module", Status.OK, vendor)


def check_params() -> Iterator[Check]:
    """The MMU parameters one row each; the other parameters of kvm.ko and the vendor module in one
    row per module and kind, non-upstream ones flagged (the JSON host facts list every value)."""
    params = hostinfo.kvm_params()
    for p in params:
        if p.module == "kvm" and p.name in hostinfo.MMU_PARAMS:
            detail = p.value or "(unreadable)"
            if p.name == "tdp_mmu":
                detail += ": faults go through the " + ("TDP MMU" if hostinfo.param_bool(p.value) else "shadow MMU")
            yield Check(f"kvm.{p.name}", Status.OK, detail, required=False)
    for module in dict.fromkeys(p.module for p in params):
        rest = [p for p in params if p.module == module and not (module == "kvm" and p.name in hostinfo.MMU_PARAMS)]
        for upstream in (True, False):
            group = [f"{p.name}={p.value}" for p in rest if p.upstream is upstream]
            if not group:
                continue
            if upstream:
                yield Check(f"{module} parameters", Status.OK, ", ".join(group), required=False)
            else:
                yield Check(f"{module} non-upstream parameters", Status.WARNING, ", ".join(group),
                            "recorded in trace metadata; their effect on MMU decisions is not modelled",
                            required=False)


def check_tracefs() -> Check:
    try:
        mounted = tracefs.is_mounted()
        tracefs.ensure_mounted()
    except HostError as exc:
        return Check("tracefs", Status.MISSING, str(exc), f"mount -t tracefs nodev {tracefs.TRACEFS} (as root)")
    if mounted:
        return Check("tracefs", Status.OK, f"mounted at {tracefs.TRACEFS}")
    return Check("tracefs", Status.OK, f"was not mounted: doctor mounted it at {tracefs.TRACEFS}")


def check_events() -> Iterator[Check]:
    """The kvm/kvmmmu events of the trace format (schema.EVENTS) that this kernel has."""
    try:
        present = tracefs.available_events(TRACEFS_GROUPS)
    except HostError as exc:
        yield Check("kvm/kvmmmu events", Status.MISSING, str(exc), "mount tracefs (see the tracefs row)")
        return
    for group in TRACEFS_GROUPS:
        wanted = [e.name for e in EVENTS if e.group == group]
        missing = [e for e in wanted if e not in present[group]]
        name = f"{group} events"
        if not present[group]:
            yield Check(name, Status.MISSING, f"no events/{group} directory in tracefs",
                        "load the kvm module (modprobe kvm) on a kernel built with its tracepoints")
        elif missing:
            yield Check(name, Status.WARNING, f"{len(wanted) - len(missing)} of {len(wanted)} present; missing: "
                        f"{', '.join(missing)}", "those events cannot be recorded on this kernel", required=False)
        else:
            yield Check(name, Status.OK, f"all {len(wanted)} of the trace format present")


def check_btf() -> Check:
    if hostinfo.btf_present():
        return Check("kernel BTF", Status.OK, f"{hostinfo.BTF_VMLINUX} present (probe struct offsets come from it)")
    return Check("kernel BTF", Status.MISSING, f"{hostinfo.BTF_VMLINUX} absent",
                 "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y, or record with --backend tracefs")


def check_headers() -> Check:
    source = hostinfo.bcc_kernel_source()
    if source is None:
        return Check("bcc header tree", Status.MISSING,
                     f"no /lib/modules/{hostinfo.kernel_release()}/build and no "
                     f"{hostinfo.HEADER_CACHE}/headers-{hostinfo.kernel_release()}",
                     "./run.sh setup (installs linux-headers-amd64 and builds the tree)")
    return Check("bcc header tree", Status.OK, f"BCC_KERNEL_SOURCE={source}")


def check_bcc() -> Iterator[Check]:
    """bcc importable, then a trivial program compiled, loaded and attached in a child process
    (so a crash or bcc's compiler noise stays out of doctor)."""
    code = "import bcc, sys; bcc.BPF(text=sys.argv[1].encode())"
    try:
        proc = subprocess.run([sys.executable, "-c", "import bcc"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        proc = None
    if proc is None or proc.returncode != 0:
        yield Check("bcc importable", Status.MISSING, "python cannot import bcc",
                    "apt-get install python3-bpfcc, and use a venv made with --system-site-packages (./run.sh setup)")
        yield Check("bcc compiles and loads", Status.MISSING, "skipped: bcc not importable", "see above")
        return
    yield Check("bcc importable", Status.OK, "Debian's python3-bpfcc")
    try:
        proc = subprocess.run([sys.executable, "-c", code, BCC_PROBE_PROGRAM], capture_output=True, text=True,
                              timeout=BCC_PROBE_TIMEOUT_S, env=hostinfo.bcc_environment())
    except subprocess.TimeoutExpired:
        yield Check("bcc compiles and loads", Status.MISSING, f"no result in {BCC_PROBE_TIMEOUT_S} s", "")
        return
    if proc.returncode == 0:
        yield Check("bcc compiles and loads", Status.OK, "a raw tracepoint program compiled, loaded and attached")
    else:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        yield Check("bcc compiles and loads", Status.MISSING, f"failed: {last}",
                    "check the bcc header tree row; run as root; or record with --backend tracefs")


def check_kernel() -> Check:
    return Check("kernel", Status.OK, hostinfo.kernel_release(), required=False)


def check_lab() -> Iterator[Check]:
    """The nested lab's readiness (`mmutrace lab setup` installs it); optional: recording on this
    host does not need it, only TDP-MMU and upstream-shadow traces from `mmutrace lab run` do."""
    from mmutrace.lab.setup import lab_status

    for name, ok, fix in lab_status():
        yield Check(f"lab: {name}", Status.OK if ok else Status.WARNING, "present" if ok else "missing",
                    fix, required=False)


CHECKS: tuple[Callable[[], Check | Iterator[Check]], ...] = (
    check_root, check_dev_kvm, check_kernel, check_vendor_module, check_params, check_tracefs, check_events,
    check_btf, check_headers, check_bcc, check_lab,
)


@dataclass
class Report:
    checks: list[Check]
    host: dict[str, Any]

    @property
    def recording_works(self) -> bool:
        return not any(c.required and c.status is Status.MISSING for c in self.checks)

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.recording_works, "checks": [c.as_json() for c in self.checks], "host": self.host}


def run_checks() -> Report:
    checks: list[Check] = []
    for check in CHECKS:
        result = check()
        checks.extend([result] if isinstance(result, Check) else result)
    host = {**hostinfo.host_metadata(), "btf": hostinfo.btf_present(),
            "bcc_kernel_source": str(hostinfo.bcc_kernel_source() or "") or None}
    return Report(checks, host)
