"""The probes' struct reads against ground truth, and the BTF reader and loader checks.

The bcc tests run a guest in this process (mmutrace.kvm) under probes compiled once per session
and targeted at this pid, so every value the probes read from a kernel struct can be compared with
what the test itself asked KVM to do: the address it touched, the memslot it registered, the CR3 it
loaded, the page quota it set.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd
import pytest

from mmutrace import schema
from mmutrace.errors import HostError
from probes import btf, loader
from probes.layout import SLOTS, check_layout

DATA_GPA = 1 << 30
DATA_SLOT = 1
PFERR_WRITE, PFERR_USER = 1 << 1, 1 << 2


# --------------------------------------------------------------------------------------------
# BTF reader and loader (no BPF needed)
# --------------------------------------------------------------------------------------------


def test_btf_resolves_nested_members_as_sum_of_parts() -> None:
    kernel = btf.vmlinux()
    arch = kernel.member("kvm.arch")
    used = kernel.member("kvm.arch.n_used_mmu_pages")
    inner = kernel.member("kvm_arch.n_used_mmu_pages")
    assert used.offset == arch.offset + inner.offset
    assert used.size == 8  # unsigned long
    assert kernel.member("kvm_page_fault.gfn").size == 8
    assert kernel.member("kvm_memory_slot.id").size == 2  # short id


def test_btf_finds_members_of_anonymous_unions() -> None:
    # mmu_valid_gen shares an anonymous union with tdp_mmu_scheduled_root_to_zap
    kernel = btf.vmlinux()
    gen = kernel.member("kvm_mmu_page.mmu_valid_gen")
    assert gen.size == 1
    assert kernel.member("kvm_mmu_page.unsync").offset < gen.offset < kernel.member("kvm_mmu_page.role").offset


def test_btf_missing_member_names_the_path() -> None:
    with pytest.raises(HostError, match=r"kvm_page_fault\.no_such_field"):
        btf.vmlinux().member("kvm_page_fault.no_such_field")
    with pytest.raises(HostError, match="no_such_struct"):
        btf.vmlinux().member("no_such_struct.x")


def test_btf_tracepoint_prototypes_are_what_the_probes_read() -> None:
    kernel = btf.vmlinux()
    assert kernel.tracepoint_args("kvm_mmu_get_page") == ["struct kvm_mmu_page *", "bool"]
    loader.check_prototypes(kernel, list(loader.RAW_PROTOS))


def test_prototype_drift_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(loader.RAW_PROTOS, "kvm_mmu_set_spte", ["int", "gfn_t"])
    with pytest.raises(HostError, match="kvm_mmu_set_spte has arguments"):
        loader.check_prototypes(btf.vmlinux(), ["kvm_mmu_set_spte"])


def test_program_text_refuses_a_missing_member(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    source = tmp_path / "probe.bpf.c"
    source.write_text("u64 x = F(fault, kvm_page_fault__no_such_field);\n")
    monkeypatch.setattr(loader, "SOURCE", source)
    with pytest.raises(HostError, match=r"kvm_page_fault\.no_such_field"):
        loader.program_text(["kvm_mmu_spte_requested"], filtered=True)


def test_program_text_defines_offsets_from_btf() -> None:
    text = loader.program_text(["kvm_mmu_spte_requested"], filtered=True)
    kernel = btf.vmlinux()
    assert f"#define OFF_kvm_page_fault__gfn {kernel.member('kvm_page_fault.gfn').offset}\n" in text
    assert f"#define OFF_kvm__arch__n_max_mmu_pages {kernel.member('kvm.arch.n_max_mmu_pages').offset}\n" in text
    assert "#define WANT_kvm_mmu_spte_requested 1\n" in text
    assert "#define WANT_kvm_mmu_get_page 0\n" in text


def test_slot_layout_fills_exactly_the_schema_columns() -> None:
    check_layout()
    assert set(SLOTS) == {e.name for e in schema.EVENTS}


# --------------------------------------------------------------------------------------------
# Struct reads against what the test did (real guests, real probes)
# --------------------------------------------------------------------------------------------


def frame(table) -> pd.DataFrame:
    """A trace table as pandas with nullable exact integers (no float round-off of kernel addresses)."""
    import pyarrow as pa

    nullable = {pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(),
                pa.int64(): pd.Int64Dtype(), pa.uint8(): pd.UInt8Dtype(), pa.uint16(): pd.UInt16Dtype(),
                pa.uint32(): pd.UInt32Dtype(), pa.uint64(): pd.UInt64Dtype(), pa.bool_(): pd.BooleanDtype()}
    df = table.to_pandas(types_mapper=nullable.get)
    df["event"] = df["event"].astype(str)
    return df.sort_values(["ts_ns", "cpu", "seq"], ignore_index=True)


class Session:
    """Probes targeted at this process; ``capture(fn)`` returns the rows ``fn`` caused."""

    def __init__(self) -> None:
        from mmutrace.ringbuf import Rings

        self.probes = loader.MmuProbes([e.name for e in schema.EVENTS], [os.getpid()])
        self.rings = Rings(self.probes.ring_fds, loader.RINGBUF_PAGES * os.sysconf("SC_PAGE_SIZE"))

    def capture(self, fn: Callable[[], None]) -> pd.DataFrame:
        import pyarrow as pa

        from mmutrace.ringbuf import decode

        self.rings.drain()
        fn()
        records = self.rings.drain()
        return frame(pa.table(decode(records)))


@pytest.fixture(scope="module")
def session() -> Iterator[Session]:
    s = Session()
    yield s
    s.rings.close()
    s.probes.close()


def _touch_guest(pages: int, writes: bool, nr_mmu_pages: int | None = None):
    """A guest reading (then, if ``writes``, writing) ``pages`` fresh pages at DATA_GPA."""
    from mmutrace.kvm import OP_READ, OP_WRITE, PAGE_SIZE, Guest, HostMemory, commands

    state: dict = {}

    def run() -> None:
        with Guest(pt_pages=16) as guest:
            if nr_mmu_pages is not None:
                guest.vm.set_nr_mmu_pages(nr_mmu_pages)
            aspace = guest.new_address_space()
            mem = HostMemory(pages * PAGE_SIZE)
            try:
                guest.vm.set_user_memory_region(DATA_SLOT, DATA_GPA, mem)
                aspace.map(DATA_GPA, DATA_GPA, pages * PAGE_SIZE)
                vcpu = guest.add_vcpu(aspace)
                addrs = DATA_GPA + np.arange(pages, dtype=np.uint64) * PAGE_SIZE
                guest.run(vcpu, commands(OP_READ, addrs))
                if writes:
                    guest.run(vcpu, commands(OP_WRITE, addrs, np.arange(pages, dtype=np.uint64)))
                state.update(hva=mem.hva, cr3=aspace.cr3, addrs=addrs, pid=os.getpid())
            finally:
                mem.close()

    return run, state


@pytest.mark.bcc
def test_fault_inputs_equal_the_guest_accesses(session: Session) -> None:
    run, truth = _touch_guest(64, writes=True)
    rows = session.capture(run)
    faults = rows[(rows.event == "kvm_mmu_spte_requested") & (rows.slot_id == DATA_SLOT)]
    # one read fault and one write fault per page, in the order the guest touched them
    assert len(faults) == 128
    expected = np.concatenate([truth["addrs"], truth["addrs"]])
    assert faults.addr.to_numpy(np.uint64).tolist() == expected.tolist()
    assert faults.gfn.to_numpy(np.uint64).tolist() == (expected >> np.uint64(12)).tolist()
    ec = faults.error_code.to_numpy(np.uint64)
    assert ((ec[:64] & PFERR_WRITE) == 0).all() and ((ec[64:] & PFERR_WRITE) != 0).all()
    assert ((ec & PFERR_USER) != 0).all()  # CPL3 guest
    assert (faults.level == 1).all() and (faults.req_level == 1).all()
    assert (faults.slot_base_gfn == DATA_GPA >> 12).all()
    assert (faults.slot_npages == 64).all()
    assert (faults.slot_hva == truth["hva"]).all()
    assert (faults.slot_flags == 0).all()
    assert not faults.prefetch.any()
    assert (faults.pid == truth["pid"]).all() and (faults.vcpu == 0).all()
    assert faults.vm.nunique() == 1 and faults.vm.iloc[0] > 1 << 63  # a kernel address


@pytest.mark.bcc
def test_ioctl_inputs_equal_what_the_harness_set(session: Session) -> None:
    run, truth = _touch_guest(8, writes=False, nr_mmu_pages=100)
    rows = session.capture(run)
    region = rows[(rows.event == "ioctl_set_user_memory_region") & (rows.slot_id == DATA_SLOT)].iloc[0]
    assert (region["addr"], region["size"], region["slot_hva"]) == (DATA_GPA, 8 * 4096, truth["hva"])
    assert (region.slot_base_gfn, region.slot_npages, region.slot_flags) == (DATA_GPA >> 12, 8, 0)
    sregs = rows[rows.event == "ioctl_set_sregs"].iloc[0]
    assert sregs.cr3 == truth["cr3"]
    assert int(sregs.cr0) & (1 << 31) and int(sregs.cr4) & (1 << 5)  # PG, PAE
    assert int(sregs.efer) & (1 << 10)  # LMA
    quota = rows[rows.event == "ioctl_set_nr_mmu_pages"]
    assert quota["count"].tolist() == [100]
    # every ioctl row is followed by its return on the same thread, all of one VM
    vm = rows[rows.event == "ioctl_ret"].vm.dropna()
    assert vm.nunique() == 1
    faults = rows[rows.event == "kvm_mmu_spte_requested"]
    assert (faults.vm == vm.iloc[0]).all()
    assert (faults.mmu_max == 100).all()  # n_max_mmu_pages follows KVM_SET_NR_MMU_PAGES
    rets = rows[rows.event == "ioctl_ret"]
    assert set(rets.ret) == {0} | set(rets[rets.ioctl.isin([0xAE01, 0xAE41])].ret)  # fds for CREATE_*


@pytest.mark.bcc
def test_shadow_pages_carry_their_identity_and_quota(session: Session) -> None:
    run, _ = _touch_guest(8, writes=False)
    rows = session.capture(run)
    pages = rows[rows.event == "kvm_mmu_get_page"]
    created = pages[pages.created]
    assert len(created) >= 4  # one shadow page per guest level, at least
    assert created.sp.is_unique  # each new page is a distinct struct kvm_mmu_page
    assert (created.sp > 1 << 63).all()
    levels = created.role.to_numpy(np.int64) & 0xF
    assert set(levels) >= {1, 2, 3, 4}
    # the VM's page counter counts them: mmu_used grows by one per created page before the next
    assert (pages.mmu_used.diff().dropna() >= 0).all()
    zapped = rows[rows.event == "kvm_mmu_prepare_zap_page"]
    assert set(zapped.sp) <= set(pages.sp)  # teardown zaps pages the VM created


@pytest.mark.bcc
def test_a_full_ring_counts_what_it_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """With one-page rings and no consumer, rows + lost == probe hits, per event total; a small
    event (paging_element) fills the small ring, a full one (spte_requested) the full ring."""
    from mmutrace.ringbuf import Rings

    page = os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(loader, "RINGBUF_PAGES", 1)
    probes = loader.MmuProbes(["kvm_mmu_paging_element", "kvm_mmu_spte_requested"], [os.getpid()])
    rings = Rings(probes.ring_fds, page)
    try:
        run, _ = _touch_guest(64, writes=False)
        run()
        rows = {name: ring.drain() for name, ring in rings.rings.items()}
        lost, hits = sum(probes.lost().values()), probes.hits()
    finally:
        rings.close()
        probes.close()
    # each ring held all it could: __bpf_ringbuf_reserve refuses the record that would fill it exactly
    events = [e.name for e in schema.EVENTS]
    assert {events[i] for i in rows["small_events"]["event"]} == {"kvm_mmu_paging_element"}
    assert {events[i] for i in rows["events"]["event"]} == {"kvm_mmu_spte_requested"}
    assert len(rows["small_events"]) == page // 64 - 1 and len(rows["events"]) == page // 128 - 1
    assert lost > 0 and sum(map(len, rows.values())) + lost == sum(hits.values())
    assert hits["kvm_mmu_spte_requested"] >= 64
