"""A decision: one event a model predicts, in the trace's own vocabulary (event name + columns).

Models emit decisions through ``Tracepoints`` exactly where the kernel calls ``trace_<event>()``, so
a prediction and the recorded event it is judged against share the event name and the columns.
``IDENTITY`` names the columns that say *which* page/SPTE/gpa a decision is about (used to align
predicted and recorded streams); ``COMPARED`` the columns whose values are the decision itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Short decision-kind names (the JSON's ``kind``), one per decision event the models make.
KIND: dict[str, str] = {
    "kvm_mmu_set_accessed_bit": "accessed_bit",
    "kvm_mmu_set_dirty_bit": "dirty_bit",
    "kvm_mmu_walker_error": "walker_error",
    "kvm_mmu_get_page": "get_page",
    "kvm_mmu_sync_page": "sync_page",
    "kvm_mmu_unsync_page": "unsync_page",
    "kvm_mmu_prepare_zap_page": "prepare_zap",
    "kvm_mmu_zap_all_fast": "zap_all_fast",
    "kvm_mmu_spte_requested": "spte_requested",
    "kvm_mmu_set_spte": "set_spte",
    "kvm_mmu_split_huge_page": "split_huge_page",
    "kvm_tdp_mmu_spte_changed": "tdp_spte_changed",
    "fast_page_fault": "fast_page_fault",
    "mark_mmio_spte": "mark_mmio_spte",
    "handle_mmio_page_fault": "mmio_page_fault",
}

_SP_IDENTITY = ("gfn", "role")
_SP_VALUES = ("gfn", "role", "mmu_valid_gen", "root_count", "unsync")
IDENTITY: dict[str, tuple[str, ...]] = {
    "kvm_mmu_set_accessed_bit": ("addr",),
    "kvm_mmu_set_dirty_bit": ("addr",),
    "kvm_mmu_walker_error": (),
    "kvm_mmu_get_page": _SP_IDENTITY,
    "kvm_mmu_sync_page": _SP_IDENTITY,
    "kvm_mmu_unsync_page": _SP_IDENTITY,
    "kvm_mmu_prepare_zap_page": _SP_IDENTITY,
    "kvm_mmu_zap_all_fast": (),
    "kvm_mmu_spte_requested": ("gfn",),
    "kvm_mmu_set_spte": ("gfn", "level"),
    "kvm_mmu_split_huge_page": ("gfn", "level"),
    "kvm_tdp_mmu_spte_changed": ("gfn", "level"),
    "fast_page_fault": ("addr",),
    "mark_mmio_spte": ("gfn",),
    "handle_mmio_page_fault": ("addr",),
}
COMPARED: dict[str, tuple[str, ...]] = {
    "kvm_mmu_set_accessed_bit": ("addr",),
    "kvm_mmu_set_dirty_bit": ("addr",),
    "kvm_mmu_walker_error": ("error_code",),
    "kvm_mmu_get_page": _SP_VALUES + ("created",),
    "kvm_mmu_sync_page": _SP_VALUES,
    "kvm_mmu_unsync_page": _SP_VALUES,
    "kvm_mmu_prepare_zap_page": _SP_VALUES,
    "kvm_mmu_zap_all_fast": ("mmu_valid_gen", "mmu_used"),
    "kvm_mmu_spte_requested": ("gfn", "level"),
    "kvm_mmu_set_spte": ("gfn", "level", "spte", "sptep_offset"),
    "kvm_mmu_split_huge_page": ("gfn", "level", "spte", "ret"),
    "kvm_tdp_mmu_spte_changed": ("gfn", "level", "old_spte", "new_spte", "as_id"),
    "fast_page_fault": ("addr", "error_code", "old_spte", "new_spte", "ret"),
    "mark_mmio_spte": ("gfn", "access", "gen"),
    "handle_mmio_page_fault": ("addr", "gfn", "access"),
}
DECISION_EVENTS = frozenset(KIND)


@dataclass(slots=True)
class Decision:
    """One predicted decision.

    ``twin`` is the kernel function that makes it; ``undecidable`` names the missing input when the
    model cannot decide (the engine then adopts the recorded outcome).  A divergence's context is
    built by the engine only when one is reported (one decision per guest page is judged).
    """

    event: str
    values: dict[str, Any]
    twin: str
    undecidable: str | None = None
    #: The model object the decision is about (a ShadowPage), so an adopted outcome can be applied.
    subject: Any = None

    @property
    def kind(self) -> str:
        return KIND[self.event]

    def identity(self) -> tuple:
        return tuple(self.values.get(c) for c in IDENTITY[self.event])


class Tracepoints:
    """Where a model's ``trace_*`` calls land: an ordered list the engine drains after each step."""

    __slots__ = ("out",)

    def __init__(self) -> None:
        self.out: list[Decision] = []

    def emit(self, decision: Decision) -> None:
        self.out.append(decision)

    def drain(self) -> list[Decision]:
        out, self.out = self.out, []
        return out
