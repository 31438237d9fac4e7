"""ftrace text → the trace schema: the ``trace``/``trace_pipe`` text and ``trace-cmd report`` output.

The printed text is all an ftrace capture keeps, so each kvm/kvmmmu event has one small pattern that
mirrors its ``TP_printk`` (``PRINT_FORMATS``, written from the format files of 6.1, 6.12 and 6.18;
where a kernel prints an event differently, each variant has its own pattern).  Fields that the text
shows only in decoded form are turned back into numbers: the shadow-page role word from its printed
parts (``role_from_text``), PFERR flag names, exit-reason and KVM_EXIT names (from the kernel's own
``__print_symbolic`` tables, read from format files), RET_PF values from ``spurious``/``fixed``.

Parsing is columnar: a chunk of lines becomes one Arrow string array, one RE2 expression
(``pyarrow.compute.extract_regex``) splits every line into header and body, lines are grouped by
event, and each event's pattern runs over its group; hex and decimal text is cast to integers by
Arrow.  Only printed *names* (a handful of distinct values) go through Python.  Lines that do not
parse are counted per reason (``ParseStats.unparsed``), never dropped silently; events outside the
trace format (kvm_fpu, sched_switch, ...) are counted as skipped.
"""

from __future__ import annotations

import enum
import gzip
import os
import re
import shutil
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmutrace import storage
from mmutrace.errors import HostError, TraceFileError
from mmutrace.schema import ARROW_SCHEMA, EVENTS, EVENTS_BY_NAME, SORT_COLUMNS
from mmutrace.tracefs import TRACEFS, parse_format, read_format
from replay.role import ACCESS_STR, PRINTED_ROLE_MASK, ROLE_LAYOUT_6_1

#: Default limit on unparsed lines, as a fraction of the event lines (``mmutrace import --max-unparsed``).
MAX_UNPARSED_FRACTION = 0.01
#: Bytes of text parsed per batch: bounds memory for multi-GB captures.
CHUNK_BYTES = 64 << 20

# --------------------------------------------------------------------------------------------
# kvm_mmu_page_role as the text shows it (KVM_MMU_PAGE_PRINTK in mmutrace.h)
# --------------------------------------------------------------------------------------------


#: Role bits the printed text determines; an imported role has the hidden ones 0, and replay and
#: diff compare roles under this mask only (replay.role.known_role_mask).
ROLE_KNOWN_MASK = PRINTED_ROLE_MASK
_ROLE_SHIFT = {name: shift for name, (shift, _) in ROLE_LAYOUT_6_1.fields.items()}
_ACCESS_BITS = {text: bits for bits, text in enumerate(ACCESS_STR)}


def access_from_text(text: str) -> int:
    """ACC_* bits from mmutrace.h's ``access_str[]`` (``w``=ACC_WRITE 2, ``u``=ACC_USER 4, ``x``=ACC_EXEC 1)."""
    return _ACCESS_BITS[text]


def role_from_text(level: Any, gpte_bytes: Any, quadrant: Any, direct: Any, access: Any, invalid: Any,
                   nxe: Any, ad: Any) -> Any:
    """The role word as far as ``l<level> <4|8>-byte q<quadrant> [direct] <wux> [invalid] [!]nxe [!]ad``
    tells it; bits outside ROLE_KNOWN_MASK are 0.  Works on ints or on equally long numpy arrays
    (``access`` already as ACC_* bits; the flags as bools, ``nxe``/``ad`` true when printed without ``!``)."""
    as_int = lambda v: np.asarray(v).astype(np.int64)  # noqa: E731 - local shorthand
    return (
        (as_int(level) << _ROLE_SHIFT["level"])
        | (as_int(np.asarray(gpte_bytes) == 4) << _ROLE_SHIFT["has_4_byte_gpte"])
        | (as_int(quadrant) << _ROLE_SHIFT["quadrant"]) | (as_int(direct) << _ROLE_SHIFT["direct"])
        | (as_int(access) << _ROLE_SHIFT["access"]) | (as_int(invalid) << _ROLE_SHIFT["invalid"])
        | (as_int(nxe) << _ROLE_SHIFT["efer_nx"]) | (as_int(np.logical_not(ad)) << _ROLE_SHIFT["ad_disabled"])
    )


# --------------------------------------------------------------------------------------------
# Value tables the text prints by name
# --------------------------------------------------------------------------------------------

#: PFERR_* names as __print_flags prints them (6.1/6.12: P W U RSVD F; 6.18 adds PK SS SGX).
PFERR_FLAGS = {"P": 1 << 0, "W": 1 << 1, "U": 1 << 2, "RSVD": 1 << 3, "F": 1 << 4, "PK": 1 << 5, "SS": 1 << 6,
               "SGX": 1 << 15}
#: kvm_exit's flag on a VMX exit reason (``__print_flags(exit_reason & ~0xffff, ...)``).
VMX_EXIT_REASONS_FAILED_VMENTRY = 0x80000000


class RetPfNumbering(enum.Enum):
    """(RET_PF_FIXED, RET_PF_SPURIOUS): RET_PF_WRITE_PROTECTED (6.12) shifted both up by one."""

    V6_1 = (4, 5)
    V6_12 = (5, 6)

    @classmethod
    def for_release(cls, release: str) -> RetPfNumbering:
        m = re.match(r"(\d+)\.(\d+)", release)
        if not m:
            raise TraceFileError(f"cannot read a kernel version from {release!r} (expected e.g. 6.1 or 6.12.117)")
        return cls.V6_12 if (int(m[1]), int(m[2])) >= (6, 12) else cls.V6_1


_BUNDLED_FORMATS = Path(__file__).with_name("tracefs_formats")


def symbol_table(event: str) -> dict[str, int]:
    """Names → values of ``kvm:<event>``'s printed symbols: the bundled 6.18 format (a superset of
    6.1's and 6.12's tables), extended by the running kernel's when it has the event."""
    table = parse_format((_BUNDLED_FORMATS / f"kvm.{event}.format").read_text()).symbols()
    try:
        table |= read_format("kvm", event, root=TRACEFS).symbols()  # never mounts: import needs no root
    except (HostError, OSError):
        pass  # importing on a host without KVM or tracefs: the bundled table is complete up to 6.18
    return table


def symbol_value(name: str, table: dict[str, int]) -> int | None:
    """A ``__print_symbolic`` name back to its value; values without a name print as ``0x..``."""
    if name in table:
        return table[name]
    return int(name, 16) if re.fullmatch(r"0x[0-9a-fA-F]+", name) else None


def pferr_from_flags(text: str) -> int:
    """PFERR bits from ``__print_flags`` text such as ``P|W|U`` (unnamed leftovers print as 0x..)."""
    return sum(PFERR_FLAGS[f] if f in PFERR_FLAGS else int(f, 16) for f in text.split("|") if f)


def exit_reason_from_text(text: str, table: dict[str, int]) -> int | None:
    """kvm_exit's ``reason %s%s%s``: a VMX or SVM name (names may hold spaces: ``PF excp``), then
    `` FAILED_VMENTRY`` for a failed VMX entry, or hex when the value has no name."""
    name, failed = text.removesuffix(" FAILED_VMENTRY"), text.endswith(" FAILED_VMENTRY")
    value = symbol_value(name, table)
    if value is None:
        return None
    return (value | (VMX_EXIT_REASONS_FAILED_VMENTRY if failed else 0)) & 0xFFFFFFFF  # -1 invalid_guest_state: u32


# --------------------------------------------------------------------------------------------
# One pattern per print format
# --------------------------------------------------------------------------------------------

# ``{name:kind}`` in a pattern is a named group of one TP_printk conversion:
#   x  %llx / %#llx / 0x%lx (hex, optional 0x)   d  %d / %u (decimal)   p  %p (pointer, hex)
_KINDS = {"x": r"(?:0x)?(?P<{}>[0-9a-fA-F]+)", "d": r"(?P<{}>-?\d+)", "p": r"(?:0x)?(?P<{}>[0-9a-fA-F]+)"}
_TOKEN = re.compile(r"\{(\w+):([xdp])\}")

Fields = dict[str, pa.Array]  # tracefs field name (or a printed word's group) -> one value per line


@dataclass(frozen=True)
class PrintFormat:
    """The printed shape of one event on some kernels.  ``variant`` names the kernels that print it
    this way when they differ ('' = all three); it feeds the kernel guess of an import."""

    event: str
    text: str
    variant: str = ""

    @property
    def regex(self) -> str:
        """The RE2 expression of a whole body (the trailing %c of a 0 char and padding allowed)."""
        return "^" + _TOKEN.sub(lambda m: _KINDS[m[2]].format(m[1]), self.text) + r"[ \t\x00]*$"

    def decode(self, bodies: pa.Array) -> tuple[np.ndarray, Fields]:
        """Which bodies match, and the fields of those that do; numbers cast from their printk text."""
        found = pc.extract_regex(bodies, self.regex)
        hit = found.is_valid().to_numpy(zero_copy_only=False)
        found = found.filter(pa.array(hit))
        kinds = dict(_TOKEN.findall(self.text))
        out: Fields = {}
        for i, f in enumerate(found.type):
            values = found.field(i)
            kind = kinds.get(f.name)
            if kind in ("x", "p"):
                values = pc.cast(pc.binary_join_element_wise("0x", values, ""), pa.uint64())  # Arrow reads 0x..
            elif kind == "d":
                values = pc.cast(values, pa.int64())
            out[f.name] = values
        return hit, out


# KVM_MMU_PAGE_PRINTK: "sp gen %u gfn %llx l%u %u-byte q%u%s %s%s %snxe %sad root %u %s%c"
_SP_TEXT = (r"sp gen {mmu_valid_gen:d} gfn {gfn:x} l{level:d} {gpte_bytes:d}-byte q{quadrant:d}(?P<direct> direct)?"
            r" (?P<access>[-w][-u][-x])(?P<invalid> invalid)? (?P<nxe>!?)nxe (?P<ad>!?)ad root {root_count:d}"
            r" (?P<sync>sync|unsync)")
_PFERR_TEXT = r"pferr {pferr:x} ?[A-Z|x0-9]*"
_EXIT_HEAD = r"vcpu {vcpu_id:d} reason (?P<reason>.+?) rip {guest_rip:x} info1 {info1:x} info2 {info2:x}"

PRINT_FORMATS: tuple[PrintFormat, ...] = (
    PrintFormat("kvm_mmu_pagetable_walk", r"addr {addr:x} " + _PFERR_TEXT),
    PrintFormat("kvm_mmu_paging_element", r"pte {pte:x} level {level:d}"),
    PrintFormat("kvm_mmu_set_accessed_bit", r"gpa {gpa:x}"),
    PrintFormat("kvm_mmu_set_dirty_bit", r"gpa {gpa:x}"),
    PrintFormat("kvm_mmu_walker_error", _PFERR_TEXT),
    PrintFormat("kvm_mmu_get_page", _SP_TEXT + r"\x00? ?(?P<created>new|existing)"),
    PrintFormat("kvm_mmu_sync_page", _SP_TEXT),
    PrintFormat("kvm_mmu_unsync_page", _SP_TEXT),
    PrintFormat("kvm_mmu_prepare_zap_page", _SP_TEXT),
    PrintFormat("kvm_mmu_zap_all_fast", r"kvm-mmu-valid-gen {mmu_valid_gen:d} used_pages {mmu_used_pages:x}"),
    PrintFormat("kvm_mmu_spte_requested", r"gfn {gfn:x} pfn {pfn:x} level {level:d}"),
    PrintFormat("kvm_mmu_set_spte", r"gfn {gfn:x} spte {spte:x} \([-r][-w][-x][-u]?\) level {level:d} at {sptep:x}"),
    PrintFormat("kvm_mmu_split_huge_page", r"gfn {gfn:x} spte {spte:x} level {level:d} errno {errno:d}"),
    PrintFormat("kvm_tdp_mmu_spte_changed",
                r"as id {as_id:d} gfn {gfn:x} level {level:d} old_spte {old_spte:x} new_spte {new_spte:x}"),
    PrintFormat("fast_page_fault",
                r"vcpu {vcpu_id:d} gva {cr2_or_gpa:x} error_code (?P<flags>[A-Z|x0-9]*) sptep {sptep:p}"
                r" old {old_spte:x} new {new_spte:x} spurious (?P<spurious>[01]) fixed (?P<fixed>[01])"),
    PrintFormat("mark_mmio_spte", r"sptep:{sptep:p} gfn {gfn:x} access {access:x} gen {gen:x}"),
    PrintFormat("handle_mmio_page_fault", r"addr:{addr:x} gfn {gfn:x} access {access:x}"),
    PrintFormat("check_mmio_spte", r"spte {spte:x} kvm_gen {kvm_gen:x} spte-gen {spte_gen:x} valid [01]"),
    PrintFormat("kvm_page_fault",
                r"vcpu {vcpu_id:d} rip {guest_rip:x} address {fault_address:x} error_code {error_code:x}"),
    PrintFormat("kvm_entry", r"vcpu {vcpu_id:d}, rip {rip:x} intr_info {intr_info:x} error_code {error_code:x}"
                r"(?:\[immediate exit\])?", variant="6.18"),
    PrintFormat("kvm_entry", r"vcpu {vcpu_id:d}, rip {rip:x}(?:\[immediate exit\])?", variant="6.1-6.12"),
    PrintFormat("kvm_exit", _EXIT_HEAD + r" intr_info {intr_info:x} error_code {error_code:x} requests {requests:x}",
                variant="6.18"),
    PrintFormat("kvm_exit", _EXIT_HEAD + r" intr_info {intr_info:x} error_code {error_code:x}", variant="6.1-6.12"),
    PrintFormat("kvm_unmap_hva_range", r"mmu notifier unmap range: {start:x} -- {end:x}"),
    PrintFormat("kvm_age_hva", r"mmu notifier age hva: {start:x} -- {end:x}"),
    PrintFormat("kvm_test_age_hva", r"mmu notifier test age hva: {hva:x}"),
    PrintFormat("kvm_mmio", r"mmio (?P<type_name>\S+) len {len:d} gpa {gpa:x} val {val:x}"),
    PrintFormat("kvm_pio", r"pio_(?P<rw_name>read|write) at {port:x} size {size:d} count {count:d} val {val:x}"
                r"(?: \(\.\.\.\))?"),
    PrintFormat("kvm_userspace_exit", r"reason (?P<reason_name>\S+) \({shown:d}\)"),
)

FORMATS_BY_EVENT: dict[str, tuple[PrintFormat, ...]] = {}
for _pf in PRINT_FORMATS:
    FORMATS_BY_EVENT[_pf.event] = FORMATS_BY_EVENT.get(_pf.event, ()) + (_pf,)


# --------------------------------------------------------------------------------------------
# Decoders for the fields the text prints by name
# --------------------------------------------------------------------------------------------


def map_words(words: pa.Array, fn: Callable[[str], Any], type_: pa.DataType) -> pa.Array:
    """``fn`` applied to each distinct printed word (a handful per event), then spread back."""
    encoded = pc.dictionary_encode(words)
    values = pa.array([fn(w) for w in encoded.dictionary.to_pylist()], type_)
    return values.take(encoded.indices)


@dataclass
class DecodeContext:
    """What decoding needs beyond the line: the RET_PF numbering (None = unknown kernel)."""

    ret_pf: RetPfNumbering | None
    symbols: dict[str, dict[str, int]] = field(default_factory=dict)

    def table(self, event: str) -> dict[str, int]:
        if event not in self.symbols:
            self.symbols[event] = symbol_table(event)
        return self.symbols[event]


def _decode_sp(g: Fields, ctx: DecodeContext) -> Fields:
    def flag(name: str, printed: str) -> np.ndarray:
        return pc.equal(g[name], printed).to_numpy(zero_copy_only=False)

    g["role"] = pa.array(role_from_text(
        g["level"].to_numpy(), g["gpte_bytes"].to_numpy(), g["quadrant"].to_numpy(), flag("direct", " direct"),
        map_words(g["access"], access_from_text, pa.int64()).to_numpy(), flag("invalid", " invalid"),
        flag("nxe", ""), flag("ad", "")), pa.uint32())
    g["unsync"] = pc.equal(g["sync"], "unsync")
    if "created" in g:
        g["created"] = pc.equal(g["created"], "new")
    return g


def _decode_fast_page_fault(g: Fields, ctx: DecodeContext) -> Fields:
    g["error_code"] = map_words(g["flags"], pferr_from_flags, pa.uint64())
    # "spurious %d fixed %d" tells only those two outcomes; RETRY and INVALID both print "0 0".
    fixed, spurious = ctx.ret_pf.value if ctx.ret_pf else (None, None)
    g["ret"] = pc.if_else(pc.equal(g["spurious"], "1"), pa.scalar(spurious, pa.int64()),
                          pc.if_else(pc.equal(g["fixed"], "1"), pa.scalar(fixed, pa.int64()), pa.scalar(None, pa.int64())))
    return g


def _decode_kvm_exit(g: Fields, ctx: DecodeContext) -> Fields:
    table = ctx.table("kvm_exit")
    g["exit_reason"] = map_words(g["reason"], lambda r: exit_reason_from_text(r, table), pa.uint32())
    g[BAD] = g["exit_reason"].is_null()
    return g


def _decode_kvm_mmio(g: Fields, ctx: DecodeContext) -> Fields:
    table = ctx.table("kvm_mmio")
    g["type"] = map_words(g["type_name"], lambda t: symbol_value(t, table), pa.uint32())
    g[BAD] = g["type"].is_null()
    return g


def _decode_kvm_pio(g: Fields, ctx: DecodeContext) -> Fields:
    g["rw"] = pc.cast(pc.equal(g["rw_name"], "write"), pa.uint32())
    return g


def _decode_kvm_userspace_exit(g: Fields, ctx: DecodeContext) -> Fields:
    """``reason %s (%d)``: errno < 0 prints restart/error and -errno (the reason is not shown);
    otherwise the KVM_EXIT_* name and the reason, and errno is 0 (the run ioctl succeeded)."""
    table = ctx.table("kvm_userspace_exit")
    failed = pc.is_in(g["reason_name"], pa.array(["restart", "error"]))
    reason = map_words(g["reason_name"], lambda n: symbol_value(n, table), pa.uint32())
    g["reason"] = pc.if_else(failed, pa.scalar(None, pa.uint32()), reason)
    g["errno"] = pc.if_else(failed, pc.negate(g["shown"]), pa.scalar(0, pa.int64()))
    g[BAD] = pc.and_(pc.invert(failed), reason.is_null())
    return g


#: A decoder's per-line flag: the text printed a name no table knows, so the line is unparsed.
BAD = "_bad"

_DECODERS: dict[str, Callable[[Fields, DecodeContext], Fields]] = {
    "kvm_mmu_get_page": _decode_sp,
    "kvm_mmu_sync_page": _decode_sp,
    "kvm_mmu_unsync_page": _decode_sp,
    "kvm_mmu_prepare_zap_page": _decode_sp,
    "fast_page_fault": _decode_fast_page_fault,
    "kvm_exit": _decode_kvm_exit,
    "kvm_mmio": _decode_kvm_mmio,
    "kvm_pio": _decode_kvm_pio,
    "kvm_userspace_exit": _decode_kvm_userspace_exit,
}


# --------------------------------------------------------------------------------------------
# Lines
# --------------------------------------------------------------------------------------------

# "<comm>-<tid> (<tgid>) [<cpu>] <flags> <secs>.<frac>: <event>: <body>": trace and trace_pipe (the
# tgid column with options/record-tgid, "(-------)" when unknown), trace-cmd report (no tgid, and
# flags only with -l; the event name padded with spaces).
_HEADER = (r"^ *.+?-(?P<tid>\d+) +(?:\( *(?P<tgid>\d+|-+)\) +)?\[(?P<cpu>\d+)\] +(?:[^ :\[\]]{4,6} +)?"
           r"(?P<sec>\d+)(?:\.(?P<frac>\d+))?: +(?P<event>\w+): *(?P<body>.*?)\r?$")
_LOST = re.compile(r"CPU:(\d+) \[(?:LOST (\d+) EVENTS|(\d+) EVENTS DROPPED)\]")
#: Lines that are not events but not errors either: comments, trace-cmd's preamble, empty CPUs.
_NOISE = re.compile(r"#.*|\s*|cpus=\d+|version = \d+|CPU \d+ is empty")
_MARKER_EVENTS = ("tracing_mark_write", "print")


class TextFormat(enum.Enum):
    """Which tool printed the text (metadata only: both parse the same way)."""

    TRACE = "trace"  # the trace / trace_pipe files
    TRACE_CMD = "trace-cmd"  # trace-cmd report


@dataclass
class ParseStats:
    """Everything an import reports besides the rows."""

    text_format: TextFormat = TextFormat.TRACE
    lines: int = 0
    events: int = 0
    unparsed: Counter = field(default_factory=Counter)  # reason -> lines
    skipped: Counter = field(default_factory=Counter)  # event outside the trace format -> lines
    lost_by_cpu: dict[int, int] = field(default_factory=dict)
    variants: set = field(default_factory=set)  # PrintFormat.variant labels that matched
    markers: list[tuple[int, str]] = field(default_factory=list)
    filtered_out: int = 0  # event rows of other processes (tgid filter)
    seen_events: set = field(default_factory=set)  # catalogue events with at least one row
    first_unparsed: str | None = None

    @property
    def unparsed_total(self) -> int:
        return sum(self.unparsed.values())

    def check(self, max_fraction: float = MAX_UNPARSED_FRACTION, source: str = "input") -> None:
        """Raise TraceFileError when no kvm/kvmmmu event parsed, or more than ``max_fraction`` of the
        event lines did not parse."""
        attempted = self.events + self.unparsed_total + sum(self.skipped.values()) + self.filtered_out
        counts = f"{self.lines} lines, {self.unparsed_total} unparsed, {sum(self.skipped.values())} other events"
        first = f"; first unparsed: {self.first_unparsed[:80]!r}" if self.first_unparsed else ""
        if self.events + self.filtered_out == 0:
            raise TraceFileError(f"{source}: no kvm/kvmmmu event lines ({counts}){first}")
        if self.unparsed_total > max_fraction * attempted:
            reasons = ", ".join(f"{r}: {n}" for r, n in self.unparsed.most_common(3))
            raise TraceFileError(f"{source}: {self.unparsed_total} of {attempted} lines did not parse, more than "
                                 f"{max_fraction:.2%} ({reasons}){first}")

    def kernel_guess(self) -> str | None:
        """The kernels the print formats point to ('6.18', '6.1-6.12'), None when they do not tell."""
        return "6.18" if "6.18" in self.variants else "6.1-6.12" if "6.1-6.12" in self.variants else None


@dataclass
class ParsedText:
    """A whole capture: its rows (ARROW_SCHEMA, sorted) and what parsing them found."""

    table: pa.Table
    stats: ParseStats

    @property
    def markers(self) -> list[tuple[int, str]]:
        return self.stats.markers

    @property
    def lost_by_cpu(self) -> dict[int, int]:
        return self.stats.lost_by_cpu


_EVENT_DICTIONARY = pa.array([e.name for e in EVENTS], pa.string())
_EVENT_INDEX = {e.name: i for i, e in enumerate(EVENTS)}
_NUMPY_TYPES = {f.name: np.dtype(f.type.to_pandas_dtype()) for f in ARROW_SCHEMA if f.name != "event"}


class TextParser:
    """Parses one text capture chunk by chunk, carrying per-CPU sequence numbers and the stats."""

    def __init__(self, tgid: int | None = None, kernel: str | None = None, unknown_tgid: int | None = None) -> None:
        """``tgid``: keep only that process's rows.  ``unknown_tgid``: the process a line with an
        unrecorded tgid (``(-------)``, a short-lived thread) belongs to, when the capture itself was
        limited to one process's tasks (tracefs.Capture's set_event_pid)."""
        self.tgid = tgid
        self.unknown_tgid = unknown_tgid
        self.stats = ParseStats()
        self._seq: Counter = Counter()
        self._vcpu_of_tid: dict[int, int] = {}
        self._ctx = DecodeContext(RetPfNumbering.for_release(kernel) if kernel else None)

    def parse_chunk(self, text: str) -> pa.Table:
        """The events of ``text`` (whole lines) as a table in ARROW_SCHEMA, sorted."""
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if self.stats.lines == 0 and lines and lines[0].startswith(("cpus=", "version =")):
            self.stats.text_format = TextFormat.TRACE_CMD
        self.stats.lines += len(lines)
        if not lines:
            return ARROW_SCHEMA.empty_table()
        head = pc.extract_regex(pa.array(lines, pa.string()), _HEADER)
        is_event = head.is_valid().to_numpy(zero_copy_only=False)
        for i in np.flatnonzero(~is_event):
            self._other_line(lines[i])
        head = head.filter(pa.array(is_event))
        if len(head) == 0:
            return ARROW_SCHEMA.empty_table()
        cpu = pc.cast(head.field("cpu"), pa.int64()).to_numpy()
        seq = self._sequence(cpu)
        events = pc.dictionary_encode(head.field("event"))
        codes = events.indices.to_numpy(zero_copy_only=False)
        body = head.field("body")
        ts = _timestamps(head.field("sec"), head.field("frac"))
        pieces: list[tuple[np.ndarray, Fields, str]] = []
        names = events.dictionary.to_pylist()
        # Events printed differently by 6.18 (kvm_exit, kvm_entry) first: seeing them fixes the
        # RET_PF numbering that fast_page_fault's text needs when no kernel was given.
        for code in sorted(range(len(names)), key=lambda c: len(FORMATS_BY_EVENT.get(names[c], ())) < 2):
            name = names[code]
            rows = np.flatnonzero(codes == code)
            if name in _MARKER_EVENTS:
                self._markers(name, ts[rows], body.take(pa.array(rows)))
            elif name not in FORMATS_BY_EVENT:
                self.stats.skipped[name] += len(rows)
            else:
                pieces.append(self._decode_event(name, rows, body.take(pa.array(rows))))
                if self._ctx.ret_pf is None and self.stats.kernel_guess() == "6.18":
                    self._ctx.ret_pf = RetPfNumbering.V6_12
        tid = pc.cast(head.field("tid"), pa.int64()).to_numpy()
        tgid = pc.cast(pc.if_else(pc.match_substring_regex(head.field("tgid"), r"^\d+$"), head.field("tgid"), None),
                       pa.int64())
        return self._table(pieces, ts, cpu, seq, tid, tgid)

    def _other_line(self, line: str) -> None:
        """A line without an event header: a loss note, harmless noise, or unparsed."""
        if m := _LOST.fullmatch(line.rstrip()):
            cpu = int(m[1])
            self.stats.lost_by_cpu[cpu] = self.stats.lost_by_cpu.get(cpu, 0) + int(m[2] or m[3])
        elif not _NOISE.fullmatch(line):
            self._unparsed("no ftrace line header", line)

    def _unparsed(self, reason: str, line: str, n: int = 1) -> None:
        self.stats.unparsed[reason] += n
        if self.stats.first_unparsed is None:
            self.stats.first_unparsed = line[:200]

    def _sequence(self, cpu: np.ndarray) -> np.ndarray:
        """seq = the line's index among its CPU's event lines, continued across chunks."""
        seq = np.zeros(len(cpu), np.int64)
        for c in np.unique(cpu).tolist():
            at = np.flatnonzero(cpu == c)
            seq[at] = np.arange(len(at)) + self._seq[c]
            self._seq[c] += len(at)
        return seq

    def _markers(self, name: str, ts: np.ndarray, bodies: pa.Array) -> None:
        for t, text in zip(ts.tolist(), bodies.to_pylist()):
            if name == "print":  # trace-cmd report: "print: tracing_mark_write: <text>" or "<ip>: <text>"
                text = text.split(": ", 1)[1] if ": " in text else text
            self.stats.markers.append((t, text.encode("latin-1").decode("utf-8", "replace")))

    def _decode_event(self, name: str, rows: np.ndarray, bodies: pa.Array) -> tuple[np.ndarray, Fields, str]:
        """Match ``name``'s lines against its print formats; the rows that decoded and their fields."""
        pending = np.arange(len(rows))
        parts: list[tuple[np.ndarray, Fields]] = []
        for fmt in FORMATS_BY_EVENT[name]:
            if len(pending) == 0:
                break
            hit, fields = fmt.decode(bodies.take(pa.array(pending)))
            if not hit.any():
                continue
            if fmt.variant:
                self.stats.variants.add(fmt.variant)
            if name in _DECODERS:
                fields = _DECODERS[name](fields, self._ctx)
            bad = fields.pop(BAD, None)
            ok = pending[hit]
            if bad is not None and (bad_np := bad.to_numpy(zero_copy_only=False)).any():
                for i in ok[bad_np]:
                    self._unparsed(f"{name}: a printed name no kernel table knows", bodies[int(i)].as_py())
                keep = pa.array(~bad_np)
                fields = {k: v.filter(keep) for k, v in fields.items()}
                ok = ok[~bad_np]
            parts.append((ok, fields))
            pending = pending[~hit]
        for i in pending:
            self._unparsed(f"{name}: text does not match its print format", bodies[int(i)].as_py())
        columns = {column: pa.concat_arrays([f[fname] for _, f in parts])
                   for fname, column in EVENTS_BY_NAME[name].tracefs if parts and all(fname in f for _, f in parts)}
        ok_rows = rows[np.concatenate([ok for ok, _ in parts])] if parts else np.zeros(0, np.int64)
        return ok_rows, columns, name

    def _table(self, pieces: list[tuple[np.ndarray, Fields, str]], ts: np.ndarray, cpu: np.ndarray, seq: np.ndarray,
               tid: np.ndarray, tgid: pa.Array) -> pa.Table:
        """Lay the events' columns out in line order, add the common columns, filter by tgid, sort."""
        if self.unknown_tgid is not None:
            tgid = tgid.fill_null(self.unknown_tgid)
        tgid_known = tgid.is_valid().to_numpy(zero_copy_only=False)
        tgid_np = tgid.fill_null(0).to_numpy()
        pid = np.where(tgid_known, tgid_np, tid)
        line = np.sort(np.concatenate([rows for rows, _, _ in pieces])) if pieces else np.zeros(0, np.int64)
        if self.tgid is not None:
            mine = pid[line] == self.tgid
            self.stats.filtered_out += int((~mine).sum())
            line = line[mine]
        n = len(line)
        at = np.full(len(ts), -1, np.int64)  # line -> output row
        at[line] = np.arange(n)
        event = np.zeros(n, np.int16)
        values: dict[str, np.ndarray] = {}
        valid: dict[str, np.ndarray] = {}
        for rows, columns, name in pieces:
            dest = at[rows]
            mine = dest >= 0
            event[dest[mine]] = _EVENT_INDEX[name]
            for column, array in columns.items():
                if column not in values:
                    values[column] = np.zeros(n, _NUMPY_TYPES[column])
                    valid[column] = np.zeros(n, bool)
                known = array.is_valid().to_numpy(zero_copy_only=False) & mine
                values[column][dest[known]] = array.fill_null(False if pa.types.is_boolean(array.type) else 0
                                                               ).to_numpy(zero_copy_only=False)[known]
                valid[column][dest[known]] = True
        vcpu = self._fill_vcpu(tid[line], values.pop("vcpu", np.zeros(n, np.int32)), valid.pop("vcpu", np.zeros(n, bool)))
        common = {
            "ts_ns": pa.array(ts[line], pa.uint64()),
            "cpu": pa.array(cpu[line], pa.uint16()),
            "seq": pa.array(seq[line], pa.uint32()),
            "pid": pa.array(pid[line], pa.int32()),
            "tid": pa.array(tid[line], pa.int32()),
            "vm": pa.array(tgid_np[line], pa.uint64(), mask=~tgid_known[line]),
            "vcpu": vcpu,
            "event": pa.DictionaryArray.from_arrays(pa.array(event, pa.int16()), _EVENT_DICTIONARY),
        }
        arrays = [common[f.name] if f.name in common
                  else pa.array(values[f.name], f.type, mask=~valid[f.name]) if f.name in values
                  else pa.nulls(n, f.type) for f in ARROW_SCHEMA]
        table = pa.Table.from_arrays(arrays, schema=ARROW_SCHEMA)
        self.stats.events += n
        self.stats.seen_events.update(EVENTS[i].name for i in np.unique(event).tolist())
        return sort_table(table)

    def _fill_vcpu(self, tid: np.ndarray, vcpu: np.ndarray, has: np.ndarray) -> pa.Array:
        """A vCPU runs on one thread: rows of a thread that printed a vcpu id get that vcpu."""
        for t, v in set(zip(tid[has].tolist(), vcpu[has].tolist())):
            self._vcpu_of_tid[t] = v
        if self._vcpu_of_tid and not has.all():
            for t, v in self._vcpu_of_tid.items():
                fill = ~has & (tid == t)
                vcpu[fill], has[fill] = v, True
        return pa.array(vcpu, pa.int32(), mask=~has)


def _timestamps(sec: pa.Array, frac: pa.Array) -> np.ndarray:
    """ns from ``<secs>.<frac>`` (any number of fraction digits up to 9); a clock printed without a
    fraction (counter, x86-tsc) is kept as its raw count."""
    secs = pc.cast(sec, pa.uint64()).to_numpy()
    has_frac = pc.greater(pc.utf8_length(frac), 0).to_numpy(zero_copy_only=False)
    frac_ns = pc.cast(pc.utf8_rpad(pc.if_else(pa.array(has_frac), frac, "0"), width=9, padding="0"),
                      pa.uint64()).to_numpy()
    return np.where(has_frac, secs * np.uint64(1_000_000_000) + frac_ns, secs)


def sort_table(table: pa.Table) -> pa.Table:
    """``table`` ordered by SORT_COLUMNS; trace_pipe text is already in time order, so usually a check."""
    order = np.lexsort([table[c].to_numpy() for c in reversed(SORT_COLUMNS)])
    return table if np.array_equal(order, np.arange(table.num_rows)) else table.take(order)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def read_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """The file's text (gunzipped when it starts with the gzip magic) in chunks of whole lines.

    Decoded as latin-1 so any byte sequence reads; only marker text is re-decoded as UTF-8.
    Raises TraceFileError for a missing, unreadable or truncated file.
    """
    try:
        with open(path, "rb") as raw:
            magic = raw.read(2)
        stream = gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")
    except OSError as exc:
        raise TraceFileError(f"{path}: {exc.strerror or exc}") from None
    try:
        with stream:
            while lines := stream.readlines(chunk_bytes):
                yield b"".join(lines).decode("latin-1")
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise TraceFileError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    except OSError as exc:
        raise TraceFileError(f"{path}: {exc.strerror or exc}") from None


def iter_tables(path: Path, parser: TextParser) -> Iterator[pa.Table]:
    """One sorted table per chunk of ``path``; ``parser.stats`` is complete when the iterator ends."""
    for chunk in read_chunks(path):
        table = parser.parse_chunk(chunk)
        if table.num_rows:
            yield table


def parse_file(path: Path, tgid: int | None = None, kernel: str | None = None,
               unknown_tgid: int | None = None) -> ParsedText:
    """Parse a whole capture into one table (for captures that fit in memory; import streams)."""
    parser = TextParser(tgid=tgid, kernel=kernel, unknown_tgid=unknown_tgid)
    tables = list(iter_tables(Path(path), parser))
    table = sort_table(pa.concat_tables(tables)) if tables else ARROW_SCHEMA.empty_table()
    return ParsedText(table, parser.stats)


def parse_text(text: str, tgid: int | None = None, kernel: str | None = None) -> ParsedText:
    """Parse text held in memory (tests, small captures)."""
    parser = TextParser(tgid=tgid, kernel=kernel)
    return ParsedText(parser.parse_chunk(text), parser.stats)


# --------------------------------------------------------------------------------------------
# mmutrace import
# --------------------------------------------------------------------------------------------


def import_file(source: Path, output: Path, *, kernel: str | None = None,
                max_unparsed: float = MAX_UNPARSED_FRACTION, force: bool = False) -> dict[str, Any]:
    """Convert a text capture into a trace file; returns the file's metadata.

    The file is written under a temporary name and renamed into place only when the whole input
    parsed within ``max_unparsed``: a failed import leaves no output behind.  What the text lacks
    (the bcc recorder's inputs, role bits outside ROLE_KNOWN_MASK) is null / flagged in the metadata.
    """
    source, output = Path(source), Path(output)
    storage.check_output(output, force)
    if not source.is_file():
        raise TraceFileError(f"{source}: no such file")
    tmp = output.with_name(f".{output.name}.import-{os.getpid()}")
    parser = TextParser(kernel=kernel)
    try:
        with storage.TraceWriter(tmp, {"recorder": "import"}, force=True) as writer:
            for table in iter_tables(source, parser):
                writer.write_batch(table)
            stats = parser.stats
            stats.check(max_unparsed, str(source))
            writer.update_metadata(**_import_metadata(source, stats, kernel, writer.metadata))
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(storage.partial_dir(tmp), ignore_errors=True)
        raise
    return storage.open_trace(output).metadata


def _import_metadata(source: Path, stats: ParseStats, kernel: str | None, current: dict[str, Any]) -> dict[str, Any]:
    seen = sorted(stats.seen_events)
    return {
        "kernel_release": kernel or stats.kernel_guess(),
        "import_source": {
            "path": str(source.resolve()),
            "format": stats.text_format.value,
            "lines": stats.lines,
            "events": stats.events,
            "unparsed": dict(stats.unparsed),
            "skipped": dict(stats.skipped),
            "kernel_release_from": "--kernel" if kernel else "print formats" if stats.kernel_guess() else None,
            "print_format_variants": sorted(stats.variants),
        },
        "role_known_mask": ROLE_KNOWN_MASK,
        "event_inputs": {name: [] for name in seen},
        "markers": [{"ts_ns": ts, "text": text} for ts, text in stats.markers],
        "lost": {str(cpu): n for cpu, n in sorted(stats.lost_by_cpu.items())},
    }
