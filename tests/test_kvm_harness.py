"""The KVM harness (mmutrace.kvm): page tables, the interpreter, exits and errors, on real KVM."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from mmutrace.errors import HostError
from mmutrace.kvm import OP_READ, OP_WRITE, Guest, GuestCrash, HostMemory, commands, uapi, vm
from mmutrace.kvm.guest import CMD_CAPACITY
from mmutrace.kvm.libc import SyscallError
from mmutrace.kvm.paging import PT64_ADDR_MASK, AddressSpace, PageTablePool, Pte
from mmutrace.markers import Markers

DATA = 1 << 30
PAGES = 64


def test_uapi_ioctl_numbers_match_linux_kvm_h() -> None:
    """The _IO/_IOR/_IOW encodings give the values <linux/kvm.h> defines on x86-64."""
    assert uapi.KVM_RUN == 0xAE80
    assert uapi.KVM_SET_NR_MMU_PAGES == 0xAE44
    assert uapi.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert uapi.KVM_GET_DIRTY_LOG == 0x4010AE42
    assert uapi.KVM_GET_SREGS == 0x8138AE83 and uapi.KVM_SET_SREGS == 0x4138AE84
    assert uapi.KVM_GET_REGS == 0x8090AE81 and uapi.KVM_SET_REGS == 0x4090AE82
    assert uapi.KVM_ENABLE_CAP == 0x4068AEA3
    assert uapi.KVM_CLEAR_DIRTY_LOG == 0xC018AEC0


def test_page_tables_map_4k_and_2m_user_writable_with_ad_clear() -> None:
    mem = HostMemory(64 * 4096)
    try:
        aspace = AddressSpace(PageTablePool(mem.u64, 0, 0, mem.size))
        aspace.map(DATA, DATA, 3 * 4096)
        aspace.map(2 * DATA, 4 * DATA, 2 << 20, huge=True)
        for level in (4, 3, 2):
            entry = int(mem.u64[aspace.pte_gpa(DATA + 4096, level) // 8])
            assert entry & ~PT64_ADDR_MASK == Pte.PRESENT | Pte.RW | Pte.USER, level
        leaves = [int(mem.u64[aspace.pte_gpa(DATA + i * 4096) // 8]) for i in range(4)]
        assert leaves == [DATA + i * 4096 | 0x7 for i in range(3)] + [0]
        pde = int(mem.u64[aspace.pte_gpa(2 * DATA, level=2) // 8])
        assert pde == 4 * DATA | Pte.PSE | 0x7
        # PML4 and PDPT shared (both below 512 GiB); a PD and a PT for DATA; a PD for 2*DATA.
        assert aspace.pool.next == 5 * 4096
    finally:
        mem.close()


def test_host_memory_discard_drops_the_contents() -> None:
    mem = HostMemory(4 * 4096)
    try:
        mem.u64[:] = 0xAB
        mem.discard(4096, 2 * 4096)
        per_page = mem.u64.reshape(4, 512)[:, 0]
        assert list(per_page) == [0xAB, 0, 0, 0xAB]
    finally:
        mem.close()


def _vm_flags(hva: int) -> set[str]:
    """The VmFlags of this process's mapping that contains ``hva`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if "-" in line.split(" ", 1)[0] and not line.startswith("VmFlags"):
                start, end = (int(x, 16) for x in line.split(" ", 1)[0].split("-"))
                inside = start <= hva < end
            elif inside and line.startswith("VmFlags:"):
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {hva:#x}")


@pytest.mark.parametrize(("thp", "flag"), [(True, "hg"), (False, "nh"), (None, None)])
def test_host_memory_thp_advice_is_explicit(thp: bool | None, flag: str | None) -> None:
    """True/False advise huge pages for or against (scenarios must not depend on the host's THP
    policy, which differs between this host and the lab's L1); None leaves the policy alone."""
    mem = HostMemory(4 * 4096, thp=thp)
    try:
        flags = _vm_flags(mem.hva)
        assert (flags & {"hg", "nh"}) == ({flag} if flag else set())
    finally:
        mem.close()


def test_markers_log_monotonic_time_and_write_every_sink(tmp_path) -> None:
    sinks = [tmp_path / "a", tmp_path / "b"]
    for sink in sinks:
        sink.touch()
    markers = Markers(sinks=sinks)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    markers.emit("x:start")
    markers.emit("x:end")
    assert [text for _, text in markers.log] == ["x:start", "x:end"]
    assert before <= markers.log[0][0] <= markers.log[1][0] <= time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    assert [s.read_text() for s in sinks] == ["x:startx:end"] * 2


@pytest.fixture
def guest():
    """A guest with PAGES data pages at DATA (slot 1) and one vCPU, as ``(guest, memory, vcpu)``."""
    with Guest(pt_pages=16, mmio=lambda gpa, is_write, value: gpa + 1) as g:
        mem = HostMemory(PAGES * 4096)
        try:
            g.vm.set_user_memory_region(1, DATA, mem)
            aspace = g.new_address_space()
            aspace.map(DATA, DATA, mem.size)
            aspace.map(3 * DATA, 3 * DATA, 4096)  # mapped by the guest, no memslot: MMIO
            yield g, mem, g.add_vcpu(aspace)
        finally:
            mem.close()


@pytest.mark.kvm
def test_guest_writes_land_in_host_memory_and_reads_report_them(guest) -> None:
    g, mem, vcpu = guest
    addrs = DATA + np.arange(PAGES, dtype=np.uint64) * 4096 + 8
    g.run(vcpu, commands(OP_WRITE, addrs, np.arange(PAGES) * 3 + 1))
    assert list(mem.u64.reshape(PAGES, 512)[:, 1]) == list(np.arange(PAGES) * 3 + 1)
    mem.u64.reshape(PAGES, 512)[:, 1] += 100  # the host's own writes are seen by the guest
    seen = commands(OP_READ, addrs[::-1])
    g.run(vcpu, seen)
    assert list(seen["value"]) == list(np.arange(PAGES)[::-1] * 3 + 101)
    assert g.exits == 2 and g.pages_touched == PAGES


@pytest.mark.kvm
def test_long_runs_are_split_into_buffer_sized_batches(guest) -> None:
    g, mem, vcpu = guest
    n = 2 * (CMD_CAPACITY - 1) + 5
    cmds = commands(OP_WRITE, DATA + (np.arange(n, dtype=np.uint64) % PAGES) * 4096, np.arange(n))
    g.run(vcpu, cmds)
    assert g.exits == 3
    last = n - PAGES + np.arange(PAGES)  # the last write to each page wins
    assert sorted(mem.u64.reshape(PAGES, 512)[:, 0]) == sorted(last)


@pytest.mark.kvm
def test_mmio_exits_once_per_access_and_reads_get_the_handler_value(guest) -> None:
    g, _, vcpu = guest
    cmds = commands(np.array([OP_READ, OP_WRITE, OP_READ]), [3 * DATA, 3 * DATA + 8, 3 * DATA + 16], 5)
    g.run(vcpu, cmds)
    assert g.mmio_exits == 3
    assert list(cmds["value"]) == [3 * DATA + 1, 5, 3 * DATA + 17]


@pytest.mark.kvm
def test_unmapped_address_is_a_guest_crash_with_registers_in_one_line(guest) -> None:
    g, _, vcpu = guest
    with pytest.raises(GuestCrash) as exc:
        g.run(vcpu, commands(OP_READ, [5 * DATA]))
    message = str(exc.value)
    assert "\n" not in message
    assert "KVM_EXIT_SHUTDOWN" in message and f"cr2={5 * DATA:#x}" in message and "cs=0x33/dpl3" in message


@pytest.mark.kvm
def test_nr_mmu_pages_below_the_kernel_minimum_is_einval(guest) -> None:
    g, _, _ = guest
    with pytest.raises(SyscallError) as exc:
        g.vm.set_nr_mmu_pages(63)
    assert exc.value.errno == 22
    g.vm.set_nr_mmu_pages(64)


@pytest.mark.kvm
def test_dirty_log_bitmap_has_exactly_the_written_pages(guest) -> None:
    g, mem, vcpu = guest
    g.vm.set_user_memory_region(1, DATA, mem, flags=uapi.KVM_MEM_LOG_DIRTY_PAGES)
    written = [0, 5, 6, 63]
    g.run(vcpu, commands(OP_WRITE, DATA + np.array(written, dtype=np.uint64) * 4096, 1))
    assert list(np.flatnonzero(g.vm.get_dirty_log(1))) == written
    assert not g.vm.get_dirty_log(1).any(), "GET_DIRTY_LOG resets the log"


def test_open_kvm_names_what_is_missing(monkeypatch) -> None:
    monkeypatch.setattr(vm, "KVM_DEV", "/nonexistent/kvm")
    if os.geteuid() == 0:
        with pytest.raises(HostError, match="/nonexistent/kvm does not exist"):
            vm.open_kvm()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(HostError, match="needs root"):
        vm.open_kvm()
