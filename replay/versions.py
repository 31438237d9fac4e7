"""Per-kernel rules, as named switches chosen from the trace's ``kernel_release``.

Every place where the kernels we know (6.1, 6.12, 6.18) decide differently is one field here, with
where it comes from; the models read the field and never test a version number themselves.  An
unknown release is refused (MmutraceError) unless the user names the rules to assume.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, replace

from mmutrace.errors import MmutraceError
from replay.role import ROLE_LAYOUT_6_1, ROLE_LAYOUT_6_12, ROLE_LAYOUT_6_18, RoleLayout
from replay.spte import SpteRules


class Split(enum.Enum):
    """Where the common fault path calls make_mmu_pages_available (RFC patch 9)."""

    #: Before the split: every direct fault reclaims, the TDP MMU's included (upstream <= 6.2, 6.1.0).
    PRE = "pre"
    #: RFC patch 9 / upstream 6.3+ and stable 6.1.y: only the shadow MMU's fault path reclaims.
    RFC = "rfc"


@dataclass(frozen=True)
class RetPf:
    """RET_PF_* values (mmu_internal.h); RET_PF_WRITE_PROTECTED arrived in 6.12 (None before)."""

    CONTINUE: int
    RETRY: int
    EMULATE: int
    WRITE_PROTECTED: int | None
    INVALID: int
    FIXED: int
    SPURIOUS: int


RET_PF_6_1 = RetPf(CONTINUE=0, RETRY=1, EMULATE=2, WRITE_PROTECTED=None, INVALID=3, FIXED=4, SPURIOUS=5)
RET_PF_6_12 = RetPf(CONTINUE=0, RETRY=1, EMULATE=2, WRITE_PROTECTED=3, INVALID=4, FIXED=5, SPURIOUS=6)


@dataclass(frozen=True)
class VersionRules:
    """The switches.  ``name`` is the rule set's name, what ``--assume-version`` takes."""

    name: str
    role_layout: RoleLayout
    #: SHADOW_NONPRESENT_VALUE: 0 in 6.1, bit 63 from the TDX prep work (6.12, 6.18).
    nonpresent_spte: int
    ret_pf: RetPf
    spte: SpteRules
    #: Shadow fault path: is_page_fault_stale() before make_mmu_pages_available() (v6.18.38 text)
    #: or after it (6.1.192, 6.12.117).  Changes only faults whose reclaim zaps their own root.
    stale_check_before_reclaim: bool
    #: Default split of the recorded kernel: PRE only for upstream 6.1.0 itself.
    split: Split
    #: kvm_mmu_child_role() clears ``invalid`` (nested-zap hardening in 6.1.192 and 6.12.117).
    child_role_clears_invalid: bool
    #: The MMU shrinker and zapped_obsolete_pages exist (removed in 6.13).
    has_mmu_shrinker: bool


RULES_6_12 = VersionRules(
    name="6.12", role_layout=ROLE_LAYOUT_6_12, nonpresent_spte=1 << 63, ret_pf=RET_PF_6_12,
    spte=SpteRules(accessed_when_synchronizing=False, dirty_when_old_writable=False, old_writable_needs_leaf=False),
    stale_check_before_reclaim=False, split=Split.RFC, child_role_clears_invalid=True, has_mmu_shrinker=True)
RULES_6_1 = replace(RULES_6_12, name="6.1", role_layout=ROLE_LAYOUT_6_1, nonpresent_spte=0, ret_pf=RET_PF_6_1)
RULES_6_18 = replace(
    RULES_6_12, name="6.18", role_layout=ROLE_LAYOUT_6_18,
    spte=SpteRules(accessed_when_synchronizing=True, dirty_when_old_writable=True, old_writable_needs_leaf=True),
    stale_check_before_reclaim=True, has_mmu_shrinker=False)

KNOWN_RULES: dict[str, VersionRules] = {r.name: r for r in (RULES_6_1, RULES_6_12, RULES_6_18)}

_RELEASE = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?(.*)$")


def rules_for_release(release: str | None, assume: str | None = None) -> VersionRules:
    """The rule set for a ``uname -r`` string, or for ``assume`` (a KNOWN_RULES name) when given.

    Upstream 6.1.0 itself (``6.1`` / ``6.1.0`` with no distribution suffix) still reclaimed on TDP MMU
    faults, so its default split is PRE; Debian's ``6.1.0-NN-amd64`` is a 6.1.y stable build (RFC).
    """
    if assume is not None:
        if assume not in KNOWN_RULES:
            raise MmutraceError(f"--assume-version {assume!r} is not one of {', '.join(KNOWN_RULES)}")
        return KNOWN_RULES[assume]
    match = _RELEASE.match(release or "")
    if match is None:
        raise MmutraceError(f"trace has no usable kernel_release ({release!r}); "
                            f"pass --assume-version {'|'.join(KNOWN_RULES)}")
    major_minor = f"{match.group(1)}.{match.group(2)}"
    if major_minor not in KNOWN_RULES:
        raise MmutraceError(f"kernel {release} has layouts this replay does not know (known: "
                            f"{', '.join(KNOWN_RULES)}); pass --assume-version {'|'.join(KNOWN_RULES)} to try one")
    rules = KNOWN_RULES[major_minor]
    if major_minor == "6.1" and (match.group(3) in (None, "0")) and not match.group(4):
        rules = replace(rules, split=Split.PRE)
    return rules
