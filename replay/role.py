"""``union kvm_mmu_page_role`` (arch/x86/include/asm/kvm_host.h) as a typed value, per kernel layout.

The shadow-page hash key is ``(gfn, role.word)``: two shadow pages with the same gfn and the same
word are the same page, so the model keeps roles as the raw 32-bit word and decodes fields only where
a rule reads them.  Bits are LSB-first x86 bitfields; the only layout change among the kernels we
know is bit 19, ``is_mirror`` (TDX prep series, absent in 6.12.117, present in the 6.18 host's BTF).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

#: ACC_* bits of ``role.access`` and of walk access (mmu.h): exec, write, user.
ACC_EXEC_MASK = 1
ACC_WRITE_MASK = 2
ACC_USER_MASK = 4
ACC_ALL = ACC_EXEC_MASK | ACC_WRITE_MASK | ACC_USER_MASK

#: ``access_str[role.access]`` of the KVM_MMU_PAGE_PRINTK print format.
ACCESS_STR = ("---", "--x", "w--", "w-x", "-u-", "-ux", "wu-", "wux")

# (field, first bit, width) in declaration order; identical in 6.1, 6.12 and 6.18 except bit 19.
_COMMON_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("level", 0, 4),
    ("has_4_byte_gpte", 4, 1),
    ("quadrant", 5, 2),
    ("direct", 7, 1),
    ("access", 8, 3),
    ("invalid", 11, 1),
    ("efer_nx", 12, 1),
    ("cr0_wp", 13, 1),
    ("smep_andnot_wp", 14, 1),
    ("smap_andnot_wp", 15, 1),
    ("ad_disabled", 16, 1),
    ("guest_mode", 17, 1),
    ("passthrough", 18, 1),
    ("smm", 24, 8),
)


@dataclass(frozen=True)
class RoleLayout:
    """Bit positions of one kernel's role union; ``fields`` maps name -> (shift, width)."""

    name: str
    fields: dict[str, tuple[int, int]]

    def get(self, word: int, field: str) -> int:
        shift, width = self.fields[field]
        return (word >> shift) & ((1 << width) - 1)

    def set(self, word: int, field: str, value: int) -> int:
        shift, width = self.fields[field]
        mask = ((1 << width) - 1) << shift
        return (word & ~mask) | ((value << shift) & mask)

    def mask(self, names: Iterable[str]) -> int:
        """The bits the named fields occupy."""
        mask = 0
        for name in names:
            shift, width = self.fields[name]
            mask |= ((1 << width) - 1) << shift
        return mask

    @property
    def defined_mask(self) -> int:
        """Bits that belong to a named field (the rest is padding and always 0)."""
        return self.mask(self.fields)


ROLE_LAYOUT_6_1 = RoleLayout("6.1", {name: (shift, width) for name, shift, width in _COMMON_FIELDS})
#: 6.12.117 has the same layout as 6.1 (is_mirror not yet merged).
ROLE_LAYOUT_6_12 = replace(ROLE_LAYOUT_6_1, name="6.12")
ROLE_LAYOUT_6_18 = RoleLayout("6.18", {**ROLE_LAYOUT_6_1.fields, "is_mirror": (19, 1)})

#: Fields KVM_MMU_PAGE_PRINTK prints; cr0_wp, smep/smap_andnot_wp, guest_mode, passthrough, is_mirror
#: and smm are hidden, so a role word rebuilt from tracefs text has them 0.
PRINTED_FIELDS = ("level", "has_4_byte_gpte", "quadrant", "direct", "access", "invalid", "efer_nx", "ad_disabled")
#: The role bits tracefs text determines (the printed fields sit at the same bits in every known layout).
PRINTED_ROLE_MASK = ROLE_LAYOUT_6_1.mask(PRINTED_FIELDS)


def known_role_mask(metadata: dict[str, Any]) -> int:
    """The role-word bits a trace really carries: all of them from the recorder's raw tracepoints,
    only PRINTED_ROLE_MASK from tracefs text (an import, or the tracefs backend)."""
    if "role_known_mask" in metadata:
        return int(metadata["role_known_mask"])
    return PRINTED_ROLE_MASK if metadata.get("recorder") in ("tracefs", "import") else 0xFFFFFFFF


@dataclass(frozen=True)
class PageRole:
    """A decoded role word, for messages and rules that read several fields at once."""

    word: int
    layout: RoleLayout

    def __getattr__(self, field: str) -> int:
        fields = object.__getattribute__(self, "layout").fields
        if field not in fields:
            raise AttributeError(field)
        return self.layout.get(self.word, field)

    def describe(self) -> str:
        """The tracepoint's KVM_MMU_PAGE_PRINTK rendering of the role (plus what it hides)."""
        g = self.layout.get
        w = self.word
        text = (f"l{g(w, 'level')} {4 if g(w, 'has_4_byte_gpte') else 8}-byte q{g(w, 'quadrant')}"
                f"{' direct' if g(w, 'direct') else ''} {ACCESS_STR[g(w, 'access')]}"
                f"{' invalid' if g(w, 'invalid') else ''} {'' if g(w, 'efer_nx') else '!'}nxe"
                f" {'!' if g(w, 'ad_disabled') else ''}ad")
        hidden = [f for f in ("cr0_wp", "smep_andnot_wp", "smap_andnot_wp", "guest_mode", "passthrough",
                              "is_mirror") if f in self.layout.fields and g(w, f)]
        if g(w, "smm"):
            hidden.append(f"smm={g(w, 'smm')}")
        return text + (f" [{' '.join(hidden)}]" if hidden else "")


def kvm_mmu_child_role(layout: RoleLayout, parent_word: int, spte_index: int, direct: bool, access: int,
                       clears_invalid: bool) -> int:
    """kvm_mmu_child_role(): the role of the shadow page a parent SPTE at ``spte_index`` links to.

    Parent role with level-1, the walk's access, ``direct`` as asked, passthrough 0.  A 4-byte-gpte
    guest's level-1 SPs shadow half a guest table each, so the quadrant is the parent index's low bit.
    ``clears_invalid``: the nested-zap hardening of 6.1.192/6.12.117 also clears ``invalid``.
    """
    word = layout.set(parent_word, "level", layout.get(parent_word, "level") - 1)
    word = layout.set(word, "access", access)
    word = layout.set(word, "direct", int(direct))
    word = layout.set(word, "passthrough", 0)
    if clears_invalid:
        word = layout.set(word, "invalid", 0)
    if layout.get(word, "has_4_byte_gpte"):
        word = layout.set(word, "quadrant", spte_index & 1)
    return word
