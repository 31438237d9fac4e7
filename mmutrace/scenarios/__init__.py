"""Built-in scenarios: small deterministic CPL3 guests, each driving one KVM MMU behaviour.

``SCENARIOS`` maps a name to its ``Scenario`` (name, one-line doc, default size); ``run_scenario``
runs one in this process.  docs/scenarios.md explains each and what its ``size`` means.
"""

from __future__ import annotations

from mmutrace.errors import UsageError
from mmutrace.markers import Markers
from mmutrace.scenarios import (cr3_switch, dirty_log, hugepages, memslot_churn, mmio, mmio_churn, mmu_pages_limit,
                                multi_vcpu, pt_rewrite, touch, unmap_refault)
from mmutrace.scenarios.base import Scenario, ScenarioResult

SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    touch.SCENARIO, pt_rewrite.SCENARIO, cr3_switch.SCENARIO, unmap_refault.SCENARIO, memslot_churn.SCENARIO,
    dirty_log.SCENARIO, mmu_pages_limit.SCENARIO, hugepages.SCENARIO, mmio.SCENARIO, multi_vcpu.SCENARIO,
    mmio_churn.SCENARIO,
)}


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise UsageError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None


def run_scenario(name: str, seed: int = 0, size: int | None = None, markers: Markers | None = None) -> ScenarioResult:
    """Run scenario ``name`` in a fresh VM in this process (needs root and /dev/kvm)."""
    return get_scenario(name).run(seed, size, markers)


__all__ = ["SCENARIOS", "Scenario", "ScenarioResult", "get_scenario", "run_scenario"]
