"""The model pieces against values checked by hand and against what this host's kernel recorded.

Expected values come from real events in tests/data (the tracefs text is quoted next to each) and
from the layouts in shared/docs/kvm-mmu-reference.md sections 2-4.
"""

from __future__ import annotations

import ast
import inspect

import pytest

import replay.mmu
from mmutrace.errors import MmutraceError
from replay.paging_tmpl import PTTYPE_64, CpuRole, walk_addr_generic
from replay.role import (ACC_ALL, ROLE_LAYOUT_6_1, ROLE_LAYOUT_6_12, ROLE_LAYOUT_6_18, PageRole,
                         kvm_mmu_child_role)
from replay.shadow_mmu_api import ShadowMmuApi
from replay.spte import NON_EPT, make_spte
from replay.tdp_mmu_api import TdpMmuApi
from replay.versions import RULES_6_1, RULES_6_12, RULES_6_18, Split, rules_for_release

# "kvm_mmu_get_page: sp gen 0 gfn 28 l4 8-byte q0 wux nxe ad root 0 sync new" (imported text: the
# hidden bits, cr0_wp among them, read as 0)
ROOT_ROLE_TEXT = 0x1704


def test_role_word_decodes_like_the_tracepoint_prints_it() -> None:
    role = PageRole(ROOT_ROLE_TEXT, ROLE_LAYOUT_6_18)
    assert (role.level, role.access, role.efer_nx, role.direct, role.quadrant) == (4, ACC_ALL, 1, 0, 0)
    assert role.describe() == "l4 8-byte q0 wux nxe ad"
    direct = PageRole(0x1000 | (5 << 8) | (1 << 7) | 1, ROLE_LAYOUT_6_18)
    assert direct.describe() == "l1 8-byte q0 direct -ux nxe ad"


def test_role_layouts_differ_only_in_is_mirror() -> None:
    assert ROLE_LAYOUT_6_1.fields == ROLE_LAYOUT_6_12.fields
    assert set(ROLE_LAYOUT_6_18.fields) - set(ROLE_LAYOUT_6_1.fields) == {"is_mirror"}
    assert ROLE_LAYOUT_6_18.fields["is_mirror"] == (19, 1)
    assert ROLE_LAYOUT_6_18.defined_mask == ROLE_LAYOUT_6_1.defined_mask | (1 << 19)
    assert "is_mirror" in PageRole(1 << 19 | 4, ROLE_LAYOUT_6_18).describe()


def test_child_role_follows_the_recorded_chain() -> None:
    # gfn 29 l3 / 2a l2 / 2b l1 under the root above: 0x1703, 0x1702, 0x1701 (tests/data/touch)
    l3 = kvm_mmu_child_role(ROLE_LAYOUT_6_18, ROOT_ROLE_TEXT, 0, False, ACC_ALL, True)
    assert l3 == 0x1703
    assert kvm_mmu_child_role(ROLE_LAYOUT_6_18, l3, 0, False, ACC_ALL, True) == 0x1702
    # read-only alias: "gfn 41 l3 ... -ux" is 0x1503 (tests/data/alias)
    assert kvm_mmu_child_role(ROLE_LAYOUT_6_18, ROOT_ROLE_TEXT, 1, False, 5, True) == 0x1503
    # a 4-byte-gpte level-1 child takes its quadrant from the parent index's low bit
    pae = ROLE_LAYOUT_6_18.set(0x1702, "has_4_byte_gpte", 1)
    assert PageRole(kvm_mmu_child_role(ROLE_LAYOUT_6_18, pae, 3, False, 7, True), ROLE_LAYOUT_6_18).quadrant == 1
    # the nested-zap hardening clears a parent's invalid bit; without it the child inherits it
    invalid = 0x1703 | 1 << 11
    assert kvm_mmu_child_role(ROLE_LAYOUT_6_18, invalid, 0, False, 7, True) & 1 << 11 == 0
    assert kvm_mmu_child_role(ROLE_LAYOUT_6_18, invalid, 0, False, 7, False) & 1 << 11


def _make(rules, **kw) -> tuple[int, bool]:
    args = dict(level=1, ad_disabled=False, prefetch=False, synchronizing=False, nx_huge_pages=False,
                old_spte=rules.nonpresent_spte, try_to_unsync=lambda: False)
    args.update(kw)
    return make_spte(NON_EPT, rules.spte, **args)


@pytest.mark.parametrize("rules", [RULES_6_1, RULES_6_12, RULES_6_18], ids=lambda r: r.name)
def test_make_spte_matches_recorded_values(rules) -> None:
    # "gfn 40000 spte 3b34825 (r-xu)": the host zero page, read fault, host page not writable
    assert _make(rules, pte_access=5, pfn=0x3B34, host_writable=False) == (0x3B34825, False)
    # "gfn 10 spte 12fefda25 (r-xu)": clean gpte on a read fault -> no W, host-writable bit 9
    assert _make(rules, pte_access=5, pfn=0x12FEFD, host_writable=True) == (0x12FEFDA25, False)
    # "gfn 10 spte 12fefde67 (rwxu)": the write fault that follows (W, D, MMU-writable)
    assert _make(rules, pte_access=7, pfn=0x12FEFD, host_writable=True, old_spte=0x12FEFDA25) == (0x12FEFDE67, False)
    # unsync refused (a write-tracked gfn): write-protected, no W/MMU-writable/D
    assert _make(rules, pte_access=7, pfn=0x31, host_writable=True, try_to_unsync=lambda: True) == (0xA25 | 0x31 << 12, True)
    # huge leaf: bit 7; 2M frame of "gfn 40000 spte 1a2200ee7 (rwxu) level 2"
    assert _make(rules, level=2, pte_access=7, pfn=0x1A2200, host_writable=True) == (0x1A2200EE7, False)
    # no exec: NX is bit 63 on the non-EPT flavour
    assert _make(rules, pte_access=6, pfn=1, host_writable=True)[0] >> 63 == 1


def test_make_spte_version_switches() -> None:
    writable = 0x1000 | 0xE67
    # 6.1/6.12 skip D when the old SPTE was writable (goto out); 6.18 always sets it
    assert not _make(RULES_6_12, pte_access=7, pfn=1, host_writable=True, old_spte=writable & ~0x40)[0] & 0x40
    assert _make(RULES_6_18, pte_access=7, pfn=1, host_writable=True, old_spte=writable & ~0x40)[0] & 0x40
    # A on a prefetch: never before 6.18's "synchronizing" rule
    assert not _make(RULES_6_12, pte_access=5, pfn=1, host_writable=True, prefetch=True, synchronizing=True)[0] & 0x20
    assert _make(RULES_6_18, pte_access=5, pfn=1, host_writable=True, prefetch=True, synchronizing=True)[0] & 0x20


def test_rules_come_from_the_release_string() -> None:
    assert rules_for_release("6.18.44-fc-v669") is RULES_6_18
    assert rules_for_release("6.12.107+deb12-amd64") is RULES_6_12
    debian = rules_for_release("6.1.0-56-amd64")
    assert debian.name == "6.1" and debian.split is Split.RFC
    assert rules_for_release("6.1.0").split is Split.PRE
    assert (RULES_6_1.nonpresent_spte, RULES_6_12.nonpresent_spte) == (0, 1 << 63)
    assert (RULES_6_1.ret_pf.FIXED, RULES_6_18.ret_pf.FIXED, RULES_6_1.ret_pf.WRITE_PROTECTED) == (4, 5, None)
    assert RULES_6_18.stale_check_before_reclaim and not RULES_6_12.stale_check_before_reclaim
    with pytest.raises(MmutraceError, match="--assume-version"):
        rules_for_release("5.15.0-91-generic")
    assert rules_for_release("5.15.0-91-generic", assume="6.12") is RULES_6_12


def test_walker_sets_accessed_bits_root_first() -> None:
    # tests/data/touch, first fault: "addr 1000 pferr 14 U|F", ptes 29007 2a007 2b007 1007, then
    # set_accessed_bit gpa 28000, 29000, 2a000, 2b008 (the root table is CR3's gfn 0x28)
    w = walk_addr_generic(PTTYPE_64, CpuRole(), 0x28, 0x1000, 0x14, [0x29007, 0x2A007, 0x2B007, 0x1007])
    assert w.fault_error_code is None and w.gfn == 1 and w.level == 1
    assert w.ad_writes == [("kvm_mmu_set_accessed_bit", g) for g in (0x28000, 0x29000, 0x2A000, 0x2B008)]
    assert w.pte_access == 5  # clean leaf: write removed until the first write sets D
    # "addr 10010 pferr 7 P|W|U" with A set everywhere: only D on the leaf (gpa 2b080)
    w = walk_addr_generic(PTTYPE_64, CpuRole(), 0x28, 0x10010, 0x7, [0x29027, 0x2A027, 0x2B027, 0x10027])
    assert w.ad_writes == [("kvm_mmu_set_dirty_bit", 0x2B080)] and w.pte_access == 7


def test_walker_errors() -> None:
    absent = walk_addr_generic(PTTYPE_64, CpuRole(), 0x28, 0x5000, 0x6, [0x29027, 0x2A027, 0x2B027, 0])
    assert absent.fault_error_code == 0x6
    readonly = walk_addr_generic(PTTYPE_64, CpuRole(), 0x28, 0x5000, 0x6, [0x29027, 0x2A027, 0x2B027, 0x5025])
    assert readonly.fault_error_code == 0x7
    nx_fetch = walk_addr_generic(PTTYPE_64, CpuRole(), 0x28, 0x5000, 0x14, [0x29027, 0x2A027, 0x2B027, 0x5027 | 1 << 63])
    assert nx_fetch.fault_error_code == 0x15
    assert walk_addr_generic(PTTYPE_64, CpuRole(), 0x28, 0x5000, 0x4, [0x29027]).truncated
    # reserved bits: PS in a PML4E, a physical address above MAXPHYADDR, NX without EFER.NX
    assert walk_addr_generic(PTTYPE_64, CpuRole(), 0x28, 0x5000, 0x6, [0x290A7]).fault_error_code == 0xF
    narrow = CpuRole(maxphyaddr=36)
    assert walk_addr_generic(PTTYPE_64, narrow, 0x28, 0x5000, 0x4, [0x29027, 1 << 40 | 0x27]).fault_error_code == 0xD
    no_nx = CpuRole(efer_nx=False)
    assert walk_addr_generic(PTTYPE_64, no_nx, 0x28, 0x5000, 0x4, [0x29027 | 1 << 63]).fault_error_code == 0xD


def _attributes_used_on(module, owner: str) -> set[str]:
    """Names accessed as ``self.<owner>.<name>`` in a module's source."""
    tree = ast.parse(inspect.getsource(module))
    used = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == owner and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            used.add(node.attr)
    return used


def _protocol_members(protocol: type) -> set[str]:
    return {name for name, _ in inspect.getmembers(protocol, inspect.isfunction)}


def test_common_mmu_calls_the_mmus_only_through_their_interfaces() -> None:
    shadow_used = _attributes_used_on(replay.mmu, "shadow")
    tdp_used = _attributes_used_on(replay.mmu, "tdp")
    assert shadow_used and tdp_used
    assert shadow_used <= _protocol_members(ShadowMmuApi), shadow_used - _protocol_members(ShadowMmuApi)
    assert tdp_used <= _protocol_members(TdpMmuApi), tdp_used - _protocol_members(TdpMmuApi)
    # and mmu.py imports neither implementation
    source = inspect.getsource(replay.mmu)
    assert "shadow_mmu import" not in source.replace("shadow_mmu_api import", "")
    assert "replay.tdp_mmu " not in source and "from replay.tdp_mmu import" not in source


def test_the_shadow_model_implements_its_interface() -> None:
    from replay.shadow_mmu import ShadowMmu

    missing = _protocol_members(ShadowMmuApi) - set(dir(ShadowMmu))
    assert not missing


def test_root_role_from_sregs_matches_the_recorded_root() -> None:
    """tests/data/bcc/pt_rewrite: KVM_SET_SREGS cr0 0x80010031 cr3 0x28000 cr4 0x20 efer 0xd00, then
    the root "gfn 28 l4 ... new" with role word 0x3704 (cr0_wp, which the printed text hides)."""
    from replay.mmu import kvm_calc_cpu_role

    role, cpu = kvm_calc_cpu_role(RULES_6_18, 0x80010031, 0x20, 0xD00)
    assert role == 0x3704
    assert (cpu.root_level, cpu.efer_nx, cpu.cr0_wp, cpu.cr4_smep) == (4, True, True, False)
    # 32-bit PAE guest: PAE shadow root, efer_nx forced on in the root role even without EFER.NX
    pae_role, pae_cpu = kvm_calc_cpu_role(RULES_6_18, 0x80010031, 0x20, 0)
    assert PageRole(pae_role, ROLE_LAYOUT_6_18).level == 3 and PageRole(pae_role, ROLE_LAYOUT_6_18).efer_nx
    assert not pae_cpu.efer_nx
    # paging off: a direct root
    assert PageRole(kvm_calc_cpu_role(RULES_6_18, 0x31, 0, 0)[0], ROLE_LAYOUT_6_18).direct == 1


@pytest.mark.parametrize(("rules", "zaps"), [(RULES_6_12, 8), (RULES_6_18, 0)], ids=["6.12", "6.18"])
def test_stale_check_versus_reclaim_order_is_a_version_switch(rules, zaps: int) -> None:
    """A stale fault with the quota exhausted: 6.12 reclaims first (zaps, then RETRY), the 6.18
    text checks staleness first (RETRY, nothing zapped)."""
    from replay.decisions import Tracepoints
    from replay.mmu import KvmArch, KvmMmu, KvmPageFault
    from replay.shadow_mmu import ShadowMmu

    arch = KvmArch(rules=rules, tp=Tracepoints(), n_max_mmu_pages=10)
    mmu = KvmMmu(arch, None, None, Split.RFC, tdp_mmu_enabled=False)  # type: ignore[arg-type]
    mmu.shadow = ShadowMmu(arch, mmu.vcpus)
    vcpu = mmu.vcpu(0)
    mmu.kvm_set_sregs(vcpu, 0x80010031, 0x28000, 0x20, 0xD00)
    mmu.kvm_mmu_reload(vcpu)
    for gfn in range(0x100, 0x108):  # eight more pages: 9 of 10 used
        mmu.shadow.kvm_mmu_get_shadow_page(vcpu, gfn, 0x3701)
    arch.tp.drain()
    walk = walk_addr_generic(PTTYPE_64, vcpu.cpu_role, 0x28, 0x1000, 0x4, [0x29027, 0x2A027, 0x2B027, 0x1027])
    fault = KvmPageFault(addr=0x1000, error_code=0x4, walker=walk, stale=True)
    with pytest.raises(StopIteration) as done:
        next(mmu.kvm_mmu_page_fault(vcpu, fault))
    assert done.value.value == "retry"
    events = [d.event for d in arch.tp.drain()]
    assert events == ["kvm_mmu_prepare_zap_page"] * zaps
