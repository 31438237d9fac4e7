"""The trace file's schema: the one contract between recording and everything after it.

A trace is one wide, typed Arrow table (stored as Parquet): one row per event, ordered by
``(ts_ns, cpu, seq)``.  Every row has the common columns; each event kind fills the field columns
listed for it in ``EVENTS`` and leaves the others null.  The recorder (bcc or tracefs), the importer
and the lab all write this schema; the replay engine, diff, info and report read only it.

Column meanings are documented in docs/schema.md.  Changing a column or an event's field list is a
schema change: bump ``SCHEMA_VERSION`` and say so in docs/schema.md.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import pyarrow as pa

SCHEMA_VERSION = 1
#: Key of the JSON document in the Parquet key/value metadata (see ``METADATA_KEYS``).
METADATA_KEY = b"mmutrace"

# --------------------------------------------------------------------------------------------
# Columns
# --------------------------------------------------------------------------------------------

#: Columns every row has, in order.  ``vm`` is a stable VM id: the ``struct kvm`` address when the
#: recorder could read it, else the owning pid (imported traces).  ``vcpu`` is the vCPU id, null
#: when the event did not run on a vCPU thread.
COMMON_COLUMNS: tuple[pa.Field, ...] = (
    pa.field("ts_ns", pa.uint64(), nullable=False),
    pa.field("cpu", pa.uint16(), nullable=False),
    pa.field("seq", pa.uint32(), nullable=False),
    pa.field("pid", pa.int32(), nullable=False),
    pa.field("tid", pa.int32(), nullable=False),
    pa.field("vm", pa.uint64()),
    pa.field("vcpu", pa.int32()),
    pa.field("event", pa.dictionary(pa.int16(), pa.string()), nullable=False),
)

#: Field columns, all nullable.  One name means one thing across events (docs/schema.md).
FIELD_COLUMNS: tuple[pa.Field, ...] = (
    # shadow / TDP page identity
    pa.field("gfn", pa.uint64()),
    pa.field("level", pa.uint8()),
    pa.field("role", pa.uint32()),  # raw kvm_mmu_page_role.word
    pa.field("root_count", pa.uint32()),
    pa.field("mmu_valid_gen", pa.uint8()),
    pa.field("unsync", pa.bool_()),
    pa.field("created", pa.bool_()),
    pa.field("sp", pa.uint64()),  # struct kvm_mmu_page address (identity of one SP's lifetime)
    # SPTEs and guest PTEs
    pa.field("spte", pa.uint64()),
    pa.field("old_spte", pa.uint64()),
    pa.field("new_spte", pa.uint64()),
    pa.field("sptep", pa.uint64()),
    pa.field("pfn", pa.uint64()),
    pa.field("as_id", pa.uint8()),
    # addresses and access
    pa.field("addr", pa.uint64()),  # gva/gpa/cr2, hva range start, mmio gpa, A/D gpa, pio port
    pa.field("end", pa.uint64()),  # hva range end (exclusive)
    pa.field("error_code", pa.uint64()),  # PFERR_* bits (pferr for walker events)
    pa.field("access", pa.uint32()),
    pa.field("ret", pa.int64()),  # RET_PF_* / -errno / ioctl return value
    pa.field("gen", pa.uint32()),  # MMIO generation in the SPTE
    pa.field("kvm_gen", pa.uint32()),  # memslot MMIO generation
    pa.field("count", pa.uint64()),  # an event's count (NR_MMU_PAGES goal, dirty bitmap pages...)
    # fault inputs (raw tracepoint on kvm_mmu_spte_requested: struct kvm_page_fault)
    pa.field("max_level", pa.uint8()),
    pa.field("req_level", pa.uint8()),
    pa.field("map_writable", pa.bool_()),
    pa.field("prefetch", pa.bool_()),
    # memslot (fault's slot, or a KVM_SET_USER_MEMORY_REGION request)
    pa.field("slot_id", pa.int32()),
    pa.field("slot_base_gfn", pa.uint64()),
    pa.field("slot_npages", pa.uint64()),
    pa.field("slot_hva", pa.uint64()),
    pa.field("slot_flags", pa.uint32()),
    # quota counters of struct kvm_arch at the event
    pa.field("mmu_used", pa.uint64()),
    pa.field("mmu_max", pa.uint64()),
    # vCPU exits and entries, emulated I/O
    pa.field("exit_reason", pa.uint32()),
    pa.field("rip", pa.uint64()),
    pa.field("info1", pa.uint64()),
    pa.field("info2", pa.uint64()),
    pa.field("size", pa.uint32()),
    pa.field("value", pa.uint64()),
    # KVM ioctls (syscall tracepoints)
    pa.field("ioctl", pa.uint32()),
    pa.field("cr0", pa.uint64()),
    pa.field("cr3", pa.uint64()),
    pa.field("cr4", pa.uint64()),
    pa.field("efer", pa.uint64()),
    pa.field("cap", pa.uint32()),  # KVM_ENABLE_CAP's capability number
)

ARROW_SCHEMA = pa.schema(COMMON_COLUMNS + FIELD_COLUMNS)
COLUMN_TYPES: dict[str, pa.DataType] = {f.name: f.type for f in ARROW_SCHEMA}
SORT_COLUMNS = ("ts_ns", "cpu", "seq")


# --------------------------------------------------------------------------------------------
# Event catalogue
# --------------------------------------------------------------------------------------------


class Role(enum.Enum):
    """What an event is to the replay: something the model is told, or something it must predict."""

    INPUT = "input"
    DECISION = "decision"
    BOTH = "input+decision"  # carries inputs (pfn, fault) next to a decision (level)


@dataclass(frozen=True)
class EventKind:
    """One event kind: its tracefs group (or origin), the columns it fills, and its replay role.

    ``tracefs`` maps a tracefs format field name to the column that holds it, so the tracefs
    backend and ``mmutrace import`` decode by this table alone.  ``inputs`` are the columns only the
    bcc recorder's input probes fill (null in tracefs/imported traces).
    """

    name: str
    group: str  # "kvmmmu", "kvm" or "ioctl" (syscall tracepoints)
    role: Role
    tracefs: tuple[tuple[str, str], ...] = ()
    inputs: tuple[str, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(col for _, col in self.tracefs) + self.inputs


_SP = (("mmu_valid_gen", "mmu_valid_gen"), ("gfn", "gfn"), ("role", "role"),
       ("root_count", "root_count"), ("unsync", "unsync"))
_QUOTA = ("mmu_used", "mmu_max")

EVENTS: tuple[EventKind, ...] = (
    # ---- kvmmmu: guest page-table walker (paging_tmpl.h)
    EventKind("kvm_mmu_pagetable_walk", "kvmmmu", Role.INPUT, (("addr", "addr"), ("pferr", "error_code"))),
    EventKind("kvm_mmu_paging_element", "kvmmmu", Role.INPUT, (("pte", "spte"), ("level", "level"))),
    EventKind("kvm_mmu_set_accessed_bit", "kvmmmu", Role.DECISION, (("gpa", "addr"),)),
    EventKind("kvm_mmu_set_dirty_bit", "kvmmmu", Role.DECISION, (("gpa", "addr"),)),
    EventKind("kvm_mmu_walker_error", "kvmmmu", Role.DECISION, (("pferr", "error_code"),)),
    # ---- kvmmmu: shadow pages
    EventKind("kvm_mmu_get_page", "kvmmmu", Role.DECISION, _SP + (("created", "created"),), ("sp",) + _QUOTA),
    EventKind("kvm_mmu_sync_page", "kvmmmu", Role.DECISION, _SP, ("sp",)),
    EventKind("kvm_mmu_unsync_page", "kvmmmu", Role.DECISION, _SP, ("sp",)),
    EventKind("kvm_mmu_prepare_zap_page", "kvmmmu", Role.DECISION, _SP, ("sp",) + _QUOTA),
    EventKind("kvm_mmu_zap_all_fast", "kvmmmu", Role.DECISION,
              (("mmu_valid_gen", "mmu_valid_gen"), ("mmu_used_pages", "mmu_used")), ("mmu_max",)),
    # ---- kvmmmu: SPTEs
    EventKind("kvm_mmu_spte_requested", "kvmmmu", Role.BOTH, (("gfn", "gfn"), ("pfn", "pfn"), ("level", "level")),
              ("addr", "error_code", "max_level", "req_level", "map_writable", "prefetch",
               "slot_id", "slot_base_gfn", "slot_npages", "slot_hva", "slot_flags") + _QUOTA),
    EventKind("kvm_mmu_set_spte", "kvmmmu", Role.DECISION,
              (("gfn", "gfn"), ("spte", "spte"), ("sptep", "sptep"), ("level", "level"))),
    EventKind("kvm_mmu_split_huge_page", "kvmmmu", Role.DECISION,
              (("gfn", "gfn"), ("spte", "spte"), ("level", "level"), ("errno", "ret"))),
    EventKind("kvm_tdp_mmu_spte_changed", "kvmmmu", Role.DECISION,
              (("gfn", "gfn"), ("old_spte", "old_spte"), ("new_spte", "new_spte"), ("level", "level"),
               ("as_id", "as_id"))),
    EventKind("fast_page_fault", "kvmmmu", Role.DECISION,
              (("vcpu_id", "vcpu"), ("cr2_or_gpa", "addr"), ("error_code", "error_code"), ("sptep", "sptep"),
               ("old_spte", "old_spte"), ("new_spte", "new_spte"), ("ret", "ret"))),
    # ---- kvmmmu: MMIO
    EventKind("mark_mmio_spte", "kvmmmu", Role.DECISION,
              (("sptep", "sptep"), ("gfn", "gfn"), ("access", "access"), ("gen", "gen"))),
    EventKind("handle_mmio_page_fault", "kvmmmu", Role.DECISION, (("addr", "addr"), ("gfn", "gfn"), ("access", "access"))),
    EventKind("check_mmio_spte", "kvmmmu", Role.BOTH, (("spte", "spte"), ("kvm_gen", "kvm_gen"), ("spte_gen", "gen"))),
    # ---- kvm: vCPU and host events
    EventKind("kvm_page_fault", "kvm", Role.INPUT,
              (("vcpu_id", "vcpu"), ("guest_rip", "rip"), ("fault_address", "addr"), ("error_code", "error_code"))),
    EventKind("kvm_entry", "kvm", Role.INPUT, (("vcpu_id", "vcpu"), ("rip", "rip")), _QUOTA),
    EventKind("kvm_exit", "kvm", Role.INPUT,
              (("exit_reason", "exit_reason"), ("guest_rip", "rip"), ("info1", "info1"), ("info2", "info2"),
               ("error_code", "error_code"), ("vcpu_id", "vcpu"))),
    EventKind("kvm_unmap_hva_range", "kvm", Role.INPUT, (("start", "addr"), ("end", "end"))),
    EventKind("kvm_age_hva", "kvm", Role.INPUT, (("start", "addr"), ("end", "end"))),
    EventKind("kvm_test_age_hva", "kvm", Role.INPUT, (("hva", "addr"),)),
    EventKind("kvm_mmio", "kvm", Role.INPUT, (("type", "access"), ("len", "size"), ("gpa", "addr"), ("val", "value"))),
    EventKind("kvm_pio", "kvm", Role.INPUT,
              (("rw", "access"), ("port", "addr"), ("size", "size"), ("count", "count"), ("val", "value"))),
    EventKind("kvm_userspace_exit", "kvm", Role.INPUT, (("reason", "exit_reason"), ("errno", "ret"))),
    # ---- KVM ioctls (syscalls:sys_enter_ioctl / sys_exit_ioctl; no tracefs twin)
    EventKind("ioctl_set_user_memory_region", "ioctl", Role.INPUT, (),
              ("slot_id", "slot_flags", "addr", "size", "slot_base_gfn", "slot_npages", "slot_hva")),
    EventKind("ioctl_set_nr_mmu_pages", "ioctl", Role.INPUT, (), ("count",)),
    EventKind("ioctl_set_sregs", "ioctl", Role.INPUT, (), ("cr0", "cr3", "cr4", "efer")),
    EventKind("ioctl_get_dirty_log", "ioctl", Role.INPUT, (), ("slot_id",)),
    EventKind("ioctl_clear_dirty_log", "ioctl", Role.INPUT, (), ("slot_id", "addr", "count", "size")),
    EventKind("ioctl_create_vm", "ioctl", Role.INPUT, (), ()),
    EventKind("ioctl_create_vcpu", "ioctl", Role.INPUT, (), ("value",)),
    EventKind("ioctl_ret", "ioctl", Role.INPUT, (), ("ioctl", "ret")),
    # added in schema version 1 without a bump (new kinds and a new column: older files simply lack them)
    EventKind("ioctl_enable_cap", "ioctl", Role.INPUT, (), ("cap", "value")),
    EventKind("ioctl_dirty_bitmap", "ioctl", Role.INPUT, (), ("slot_id", "addr", "value")),
)

EVENTS_BY_NAME: dict[str, EventKind] = {e.name: e for e in EVENTS}
TRACEFS_GROUPS = ("kvm", "kvmmmu")


def event_kind(name: str) -> EventKind:
    """The catalogue entry for ``name``; raises KeyError naming close matches."""
    try:
        return EVENTS_BY_NAME[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, EVENTS_BY_NAME, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise KeyError(f"unknown event {name!r}{hint}") from None


def event_catalogue_markdown() -> str:
    """The event catalogue as the Markdown table docs/schema.md embeds (a test keeps them equal)."""
    lines = [
        "| event | group | role | tracefs field → column | recorder inputs |",
        "|---|---|---|---|---|",
    ]
    for e in EVENTS:
        fields = ", ".join(f"{f} → `{c}`" if f != c else f"`{c}`" for f, c in e.tracefs) or "—"
        inputs = ", ".join(f"`{c}`" for c in e.inputs) or "—"
        lines.append(f"| `{e.name}` | {e.group} | {e.role.value} | {fields} | {inputs} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# File metadata (a JSON object under METADATA_KEY)
# --------------------------------------------------------------------------------------------

#: Keys of the metadata document and what they hold.  Writers fill all they know; readers must
#: accept missing optional keys (older or imported files).
METADATA_KEYS: dict[str, str] = {
    "schema_version": "int: SCHEMA_VERSION of the writer",
    "recorder": "'bcc' | 'tracefs' | 'import': how the events were captured",
    "origin": "'host' | 'nested-lab': where the recorded KVM ran",
    "kernel_release": "uname -r of the kernel whose KVM was recorded",
    "kvm_backend": "vendor module: kvm_pvm, kvm_amd, kvm_intel",
    "kvm_params": "object: every /sys/module/kvm/parameters/* value, as strings",
    "vendor_params": "object: the vendor module's parameters (npt, ept, ...)",
    "tdp_mmu": "bool: the tdp_mmu parameter at recording time",
    "probes": "list of attached probes, e.g. 'raw_tracepoint:kvm_mmu_get_page'",
    "event_inputs": "object: event name -> list of input columns the recording filled",
    "lost": "object: cpu (as string) -> events lost on that CPU",
    "lost_total": "int: sum of lost",
    "start_ns": "int: CLOCK_MONOTONIC ns at start (same clock as ts_ns)",
    "stop_ns": "int: CLOCK_MONOTONIC ns at stop",
    "start_time": "str: ISO-8601 wall-clock start",
    "command": "list of str: the traced command line, if any",
    "scenario": "object: {name, seed, size, ...} when a built-in scenario was recorded",
    "markers": "list of {ts_ns, text}: scenario phase markers",
    "complete": "bool: true after a clean close (Ctrl-C/SIGTERM included); false while recording, after a producer error, or after a repair",
    "stop_reason": "str: what ended the recording: 'command exited', 'process exited', 'duration', 'interrupted' (the recorder); an exception's class name (the writer); 'killed' (repair)",
    "reorder": "object: {window_ns, late_rows}: rows that arrived later than the reorder window (kept, placed in order)",
    "repair": "object: {segments, rows, skipped, note} when `mmutrace repair` rebuilt the file",
    "role_known_mask": "int: role-word bits the trace knows (tracefs text hides some; absent = all 32)",
    "zero_pfn": "int: pfn of the host's zero page, which read faults on untouched memory map (decides them)",
    "import_source": "object: {path, format, lines, unparsed} for imported traces",
    "event_hits": "object: event name -> how often its probe fired for a recorded process (bcc; rows + lost = hits)",
    "pid": "int: the process recorded with `record -p PID`",
    "child_status": "int: exit status of the recorded command or scenario (negative: killed by that signal)",
    "non_upstream_params": "list of str: KVM module parameters the upstream kernel does not have (hostinfo)",
}



def metadata_keys_markdown() -> str:
    """The metadata keys as the Markdown table docs/schema.md embeds (a test keeps them equal)."""
    lines = ["| key | value |", "|---|---|"]
    lines += [f"| `{key}` | {text.replace('|', '&#124;')} |" for key, text in METADATA_KEYS.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # regenerates the generated tables of docs/schema.md
    print(event_catalogue_markdown())
    print(metadata_keys_markdown(), end="")
