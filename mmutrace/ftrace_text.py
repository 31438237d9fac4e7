"""ftrace text → the trace schema: the ``trace``/``trace_pipe`` text and ``trace-cmd report`` output.

The printed text is all an ftrace capture keeps, so each kvm/kvmmmu event has one small pattern that
mirrors its ``TP_printk`` (``PRINT_FORMATS``, written from the format files of 6.1, 6.12 and 6.18;
where a kernel prints an event differently, each variant has its own pattern).  Fields that the text
shows only in decoded form are turned back into numbers: the shadow-page role word from its printed
parts (``role_from_text``), PFERR flag names, exit-reason and KVM_EXIT names (from the kernel's own
``__print_symbolic`` tables, read from the format files), RET_PF values from ``spurious``/``fixed``.

Parsing is done a chunk of lines at a time: one regular expression splits every line into its
header and body, lines are grouped by event, and each event's pattern runs over its group.  Lines
that do not parse are counted per reason (``ParseStats.unparsed``), never dropped silently; events
outside the trace format (kvm_fpu, sched_switch, ...) are counted as skipped.
"""

from __future__ import annotations

import enum
import gzip
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mmutrace.errors import HostError, TraceFileError
from mmutrace.schema import ARROW_SCHEMA, COLUMN_TYPES, EVENTS, EVENTS_BY_NAME, SORT_COLUMNS
from mmutrace.tracefs import EventFormat, parse_format, read_format

#: Default limit on unparsed lines, as a fraction of the event lines (``mmutrace import --max-unparsed``).
MAX_UNPARSED_FRACTION = 0.01
#: Lines parsed per batch: bounds memory for multi-GB captures.
CHUNK_LINES = 262_144

# --------------------------------------------------------------------------------------------
# kvm_mmu_page_role as the text shows it (KVM_MMU_PAGE_PRINTK in mmutrace.h)
# --------------------------------------------------------------------------------------------


class RoleBit(enum.IntEnum):
    """Bit positions of ``union kvm_mmu_page_role`` (LSB first; same in 6.1, 6.12, 6.18)."""

    LEVEL = 0  # 4 bits
    HAS_4_BYTE_GPTE = 4
    QUADRANT = 5  # 2 bits
    DIRECT = 7
    ACCESS = 8  # 3 bits: ACC_EXEC 1, ACC_WRITE 2, ACC_USER 4
    INVALID = 11
    EFER_NX = 12
    AD_DISABLED = 16


#: Role bits that the printed text determines: level, 4/8-byte, quadrant, direct, access, invalid,
#: nxe, ad.  cr0_wp, smep/smap_andnot_wp, guest_mode, passthrough, is_mirror and smm are not printed;
#: an imported role has them 0, and replay must compare roles under this mask only.
ROLE_KNOWN_MASK = (
    (0xF << RoleBit.LEVEL) | (1 << RoleBit.HAS_4_BYTE_GPTE) | (0x3 << RoleBit.QUADRANT) | (1 << RoleBit.DIRECT)
    | (0x7 << RoleBit.ACCESS) | (1 << RoleBit.INVALID) | (1 << RoleBit.EFER_NX) | (1 << RoleBit.AD_DISABLED)
)

_ACCESS_BITS = {"x": 1, "w": 2, "u": 4}  # access_str[] in mmutrace.h prints w, u, x in that order


def role_from_text(level: int, gpte_bytes: int, quadrant: int, direct: bool, access: str, invalid: bool,
                   nxe: bool, ad: bool) -> int:
    """The role word as far as ``sp gen .. l<level> <4|8>-byte q<quadrant> [direct] <wux> [invalid]
    [!]nxe [!]ad ..`` tells it (bits outside ROLE_KNOWN_MASK are 0)."""
    acc = sum(_ACCESS_BITS[c] for c in access if c != "-")
    return (
        (level << RoleBit.LEVEL) | (int(gpte_bytes == 4) << RoleBit.HAS_4_BYTE_GPTE) | (quadrant << RoleBit.QUADRANT)
        | (int(direct) << RoleBit.DIRECT) | (acc << RoleBit.ACCESS) | (int(invalid) << RoleBit.INVALID)
        | (int(nxe) << RoleBit.EFER_NX) | (int(not ad) << RoleBit.AD_DISABLED)
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
    """RET_PF_FIXED/RET_PF_SPURIOUS values: RET_PF_WRITE_PROTECTED (6.12) shifted them up by one."""

    V6_1 = (4, 5)
    V6_12 = (5, 6)

    @classmethod
    def for_release(cls, release: str) -> RetPfNumbering:
        major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", release).groups())
        return cls.V6_12 if (major, minor) >= (6, 12) else cls.V6_1


_BUNDLED_FORMATS = Path(__file__).with_name("tracefs_formats")


def _symbol_table(event: str) -> dict[str, int]:
    """Names → values of ``kvm:<event>``'s printed symbols: the bundled 6.18 format (a superset of
    6.1's and 6.12's tables), extended by the running kernel's when it has the event."""
    table = parse_format((_BUNDLED_FORMATS / f"kvm.{event}.format").read_text()).symbols()
    try:
        table |= read_format("kvm", event).symbols()
    except (HostError, OSError):
        pass  # importing on a host without KVM or tracefs: the bundled table is complete up to 6.18
    return table


# --------------------------------------------------------------------------------------------
# One pattern per print format
# --------------------------------------------------------------------------------------------

# ``{name:kind}`` in a pattern is a named group of one TP_printk conversion:
#   x  %llx / %#llx / 0x%lx (hex, optional 0x)   d  %d / %u (decimal)   p  %p (hashed or raw pointer)
_KINDS = {"x": r"(?:0x)?[0-9a-fA-F]+", "d": r"-?\d+", "p": r"(?:0x)?[0-9a-fA-F]+"}
_TOKEN = re.compile(r"\{(\w+):([xdp])\}")


@dataclass(frozen=True)
class PrintFormat:
    """The printed shape of one event on some kernels.  ``variant`` names the kernels that print it
    this way when they differ ('' = all three); it feeds the kernel guess of an import."""

    event: str
    text: str
    variant: str = ""

    @property
    def pattern(self) -> re.Pattern[str]:
        return _compiled(self.text)

    def numeric_groups(self) -> dict[str, str]:
        return dict(_TOKEN.findall(self.text))


_PATTERN_CACHE: dict[str, re.Pattern[str]] = {}


def _compiled(text: str) -> re.Pattern[str]:
    if text not in _PATTERN_CACHE:
        body = _TOKEN.sub(lambda m: f"(?P<{m[1]}>{_KINDS[m[2]]})", text)
        _PATTERN_CACHE[text] = re.compile(body + r"[\s\x00]*")  # trailing %c of a 0 char, padding
    return _PATTERN_CACHE[text]


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
    PrintFormat("kvm_page_fault", r"vcpu {vcpu_id:d} rip {guest_rip:x} address {fault_address:x} error_code {error_code:x}"),
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

Fields = dict[str, list]  # tracefs field name -> one value per matched line (None = unknown)
#: A decoder's per-line flag: the text printed a name no table knows, so the line is unparsed.
BAD = "_bad"


@dataclass
class DecodeContext:
    """What decoding needs beyond the line: the RET_PF numbering (None = unknown kernel)."""

    ret_pf: RetPfNumbering | None
    symbols: dict[str, dict[str, int]] = field(default_factory=dict)

    def table(self, event: str) -> dict[str, int]:
        if event not in self.symbols:
            self.symbols[event] = _symbol_table(event)
        return self.symbols[event]


def _decode_sp(g: Fields, ctx: DecodeContext) -> Fields:
    g["role"] = [
        role_from_text(lv, b, q, bool(d), acc, bool(inv), nx == "", ad == "")
        for lv, b, q, d, acc, inv, nx, ad in zip(g["level"], g["gpte_bytes"], g["quadrant"], g["direct"],
                                                 g["access"], g["invalid"], g["nxe"], g["ad"])
    ]
    g["unsync"] = [s == "unsync" for s in g["sync"]]
    if "created" in g:
        g["created"] = [c == "new" for c in g["created"]]
    return g


def pferr_from_flags(text: str) -> int:
    """PFERR bits from ``__print_flags`` text such as ``P|W|U`` (unnamed leftovers print as 0x..)."""
    return sum(PFERR_FLAGS[f] if f in PFERR_FLAGS else int(f, 16) for f in text.split("|") if f)


def _decode_fast_page_fault(g: Fields, ctx: DecodeContext) -> Fields:
    g["error_code"] = [pferr_from_flags(f) for f in g["flags"]]
    fixed, spurious = ctx.ret_pf.value if ctx.ret_pf else (None, None)
    # "spurious %d fixed %d" tells only those two outcomes; RETRY and INVALID both print "0 0".
    g["ret"] = [spurious if s == "1" else fixed if f == "1" else None for s, f in zip(g["spurious"], g["fixed"])]
    return g


def symbol_value(name: str, table: dict[str, int]) -> int | None:
    """A ``__print_symbolic`` name back to its value; unnamed values print as ``0x..``."""
    if name in table:
        return table[name]
    return int(name, 16) if re.fullmatch(r"0x[0-9a-fA-F]+", name) else None


def exit_reason_from_text(text: str, table: dict[str, int]) -> int | None:
    """kvm_exit's ``reason %s%s%s``: a VMX or SVM name (plus ``FAILED_VMENTRY``), or hex if unnamed."""
    name, _, flag = text.partition(" ")
    value = symbol_value(name, table)
    if value is None or flag not in ("", "FAILED_VMENTRY"):
        return None
    if flag:
        value |= VMX_EXIT_REASONS_FAILED_VMENTRY
    return value & 0xFFFFFFFF  # { -1, "invalid_guest_state" } is the u32 0xffffffff


def _decode_kvm_exit(g: Fields, ctx: DecodeContext) -> Fields:
    table = ctx.table("kvm_exit")
    g["exit_reason"] = [exit_reason_from_text(r, table) for r in g["reason"]]
    g[BAD] = [r is None for r in g["exit_reason"]]
    return g


def _decode_kvm_mmio(g: Fields, ctx: DecodeContext) -> Fields:
    table = ctx.table("kvm_mmio")
    g["type"] = [symbol_value(t, table) for t in g["type_name"]]
    g[BAD] = [t is None for t in g["type"]]
    return g


def _decode_kvm_pio(g: Fields, ctx: DecodeContext) -> Fields:
    g["rw"] = [int(rw == "write") for rw in g["rw_name"]]
    return g


def _decode_kvm_userspace_exit(g: Fields, ctx: DecodeContext) -> Fields:
    """``reason %s (%d)``: errno < 0 prints restart/error and -errno (the reason is not shown);
    otherwise the KVM_EXIT_* name and the reason, and errno is 0 (the run ioctl succeeded)."""
    table = ctx.table("kvm_userspace_exit")
    failed = [name in ("restart", "error") for name in g["reason_name"]]
    g["reason"] = [None if f else symbol_value(name, table) for f, name in zip(failed, g["reason_name"])]
    g["errno"] = [-shown if f else 0 for f, shown in zip(failed, g["shown"])]
    g[BAD] = [not f and r is None for f, r in zip(failed, g["reason"])]
    return g


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

# "<comm>-<tid> (<tgid>) [<cpu>] <flags> <secs>.<frac>: <event>: <body>" (trace, trace_pipe; tgid
# column with options/record-tgid, flags without trace-cmd), the LOST/DROPPED notes, or anything else.
_LINE = re.compile(
    r"^(?:"
    r" *(?P<comm>.+?)-(?P<tid>\d+) +(?:\( *(?P<tgid>\d+|-+)\) +)?\[(?P<cpu>\d+)\] +(?:[^ :\[\]]{4,6} +)?"
    r"(?P<sec>\d+)(?:\.(?P<frac>\d+))?: +(?P<event>\w+): *(?P<body>.*?)"
    r"|CPU:(?P<lost_cpu>\d+) \[(?:LOST (?P<lost>\d+) EVENTS|(?P<dropped>\d+) EVENTS DROPPED)\]"
    r"|(?P<other>.*?))\r?$",
    re.M,
)
_G = {name: i - 1 for name, i in _LINE.groupindex.items()}
#: Lines that are not events but not errors either: comments, trace-cmd's preamble, empty CPUs.
_NOISE = re.compile(r"^(?:#.*|\s*|cpus=\d+|version = \d+|CPU \d+ is empty)$")
_MARKER_EVENTS = ("tracing_mark_write", "print")


class TextFormat(enum.Enum):
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
    first_unparsed: str | None = None

    @property
    def unparsed_total(self) -> int:
        return sum(self.unparsed.values())

    def check(self, max_fraction: float = MAX_UNPARSED_FRACTION, source: str = "input") -> None:
        """Raise TraceFileError when more than ``max_fraction`` of the event lines did not parse."""
        attempted = self.events + self.unparsed_total + sum(self.skipped.values()) + self.filtered_out
        if attempted == 0:
            raise TraceFileError(f"{source}: no ftrace event lines found (not an ftrace text capture?)")
        if self.unparsed_total > max_fraction * attempted:
            reasons = ", ".join(f"{r}: {n}" for r, n in self.unparsed.most_common(3))
            raise TraceFileError(
                f"{source}: {self.unparsed_total} of {attempted} lines did not parse "
                f"(more than {max_fraction:.2%}; {reasons}; first: {self.first_unparsed!r})")

    def kernel_guess(self) -> str | None:
        """The kernel range the print formats point to ('6.18', '6.1-6.12'), None if they do not tell."""
        return "6.18" if "6.18" in self.variants else "6.1-6.12" if "6.1-6.12" in self.variants else None


@dataclass
class ParsedText:
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
_NP_TYPES = {name: np.dtype(t.to_pandas_dtype()) for name, t in COLUMN_TYPES.items() if name != "event"}


class TextParser:
    """Parses one text capture chunk by chunk, carrying per-CPU sequence numbers and the stats."""

    def __init__(self, tgid: int | None = None, kernel: str | None = None) -> None:
        self.tgid = tgid
        self.kernel = kernel
        self.stats = ParseStats()
        self._seq: Counter = Counter()
        self._vcpu_of_tid: dict[int, int] = {}
        self._ctx = DecodeContext(RetPfNumbering.for_release(kernel) if kernel else None)

    # ---- per chunk

    def parse_chunk(self, text: str) -> pa.Table:
        rows = _LINE.findall(text)
        if text.endswith("\n"):
            rows.pop()  # findall's empty match after the last newline
        if not rows:
            return ARROW_SCHEMA.empty_table()
        if self.stats.lines == 0:
            self._detect_format(text)
        self.stats.lines += len(rows)
        cols = list(zip(*rows))
        events = np.array(cols[_G["event"]], dtype=object)
        self._count_other_lines(cols, events)

        is_event = events != ""
        codes, names = pd.factorize(events)
        cpu = np.array(cols[_G["cpu"]], dtype=object)
        cpu_num = np.where(is_event, cpu, "0").astype(np.int64)
        seq = self._sequence(cpu_num, is_event)
        keep = np.zeros(len(rows), bool)
        decoded: dict[str, tuple[np.ndarray, Fields]] = {}
        body = np.array(cols[_G["body"]], dtype=object)
        for code, name in enumerate(names):
            if name == "":
                continue
            idx = np.flatnonzero(codes == code)
            if name in _MARKER_EVENTS:
                self._markers(idx, body, cols, name)
            elif name not in FORMATS_BY_EVENT:
                self.stats.skipped[name] += len(idx)
            else:
                ok, fields = self._decode_event(name, idx, body)
                keep[ok] = True
                decoded[name] = (ok, fields)
        return self._table(cols, events, cpu_num, seq, keep, decoded)

    def _detect_format(self, text: str) -> None:
        head = text.lstrip()[:64]
        if head.startswith(("cpus=", "version =")):
            self.stats.text_format = TextFormat.TRACE_CMD

    def _count_other_lines(self, cols: list[tuple], events: np.ndarray) -> None:
        for i in np.flatnonzero(events == ""):
            if cols[_G["lost_cpu"]][i]:
                cpu = int(cols[_G["lost_cpu"]][i])
                n = int(cols[_G["lost"]][i] or cols[_G["dropped"]][i])
                self.stats.lost_by_cpu[cpu] = self.stats.lost_by_cpu.get(cpu, 0) + n
            elif not _NOISE.match(line := cols[_G["other"]][i]):
                self._unparsed("no ftrace line header", line)

    def _unparsed(self, reason: str, line: str, n: int = 1) -> None:
        self.stats.unparsed[reason] += n
        if self.stats.first_unparsed is None:
            self.stats.first_unparsed = line[:200]

    def _sequence(self, cpu: np.ndarray, is_event: np.ndarray) -> np.ndarray:
        """seq = the line's index among its CPU's event lines, continued across chunks."""
        seq = np.zeros(len(cpu), np.int64)
        ev_cpu = cpu[is_event]
        counts = pd.Series(ev_cpu).groupby(ev_cpu).cumcount().to_numpy()
        base = np.array([self._seq[c] for c in ev_cpu], dtype=np.int64)
        seq[is_event] = counts + base
        for c, n in zip(*np.unique(ev_cpu, return_counts=True)):
            self._seq[int(c)] += int(n)
        return seq

    def _markers(self, idx: np.ndarray, body: np.ndarray, cols: list[tuple], name: str) -> None:
        ts = self._timestamps(cols, idx)
        for t, text in zip(ts.tolist(), body[idx].tolist()):
            if name == "print":  # trace-cmd report: "print: tracing_mark_write: <text>" or "<ip>: <text>"
                text = text.split(": ", 1)[1] if ": " in text else text
            self.stats.markers.append((int(t), text.encode("latin-1").decode("utf-8", "replace")))

    def _decode_event(self, name: str, idx: np.ndarray, body: np.ndarray) -> tuple[np.ndarray, Fields]:
        """Match ``name``'s lines against its print formats; returns the rows that matched and their fields."""
        bodies = body[idx].tolist()
        matched = np.zeros(len(idx), bool)
        fields: Fields = {}
        pending = np.arange(len(idx))
        order: list[np.ndarray] = []
        for fmt in FORMATS_BY_EVENT[name]:
            if len(pending) == 0:
                break
            matches = [fmt.pattern.fullmatch(bodies[i]) for i in pending]
            hit = np.array([m is not None for m in matches], bool)
            if not hit.any():
                continue
            if fmt.variant:
                self.stats.variants.add(fmt.variant)
            ms = [m for m in matches if m is not None]
            group: Fields = {}
            numeric = fmt.numeric_groups()
            for gname in fmt.pattern.groupindex:
                values = [m[gname] for m in ms]
                kind = numeric.get(gname)
                group[gname] = ([int(v, 16) for v in values] if kind in ("x", "p")
                                else [int(v) for v in values] if kind == "d" else values)
            if name in _DECODERS:
                group = _DECODERS[name](group, self._ctx)
            for k, v in group.items():
                fields.setdefault(k, []).extend(v)
            order.append(pending[hit])
            matched[pending[hit]] = True
            pending = pending[~hit]
        for i in pending:
            self._unparsed(f"{name}: text does not match its print format", bodies[i])
        rows = np.concatenate(order) if order else np.zeros(0, np.int64)
        rows_line = idx[rows]
        bad = np.array(fields.pop(BAD, [False] * len(rows)), bool)
        for i in np.flatnonzero(bad):
            self._unparsed(f"{name}: a printed name no kernel table knows", bodies[rows[i]])
        if bad.any():
            fields = {k: [v for v, b in zip(vals, bad) if not b] for k, vals in fields.items()}
            rows_line = rows_line[~bad]
        return rows_line, fields

    def _timestamps(self, cols: list[tuple], idx: np.ndarray) -> np.ndarray:
        """ns from ``<secs>.<frac>`` (any number of fraction digits); a clock printed without a
        fraction (counter, x86-tsc) is kept as its raw count."""
        sec = np.array([cols[_G["sec"]][i] for i in idx], dtype=object).astype(np.uint64)
        frac_s = [cols[_G["frac"]][i] for i in idx]
        lens = np.fromiter((len(f) for f in frac_s), np.int64, len(frac_s))
        frac = np.array([f or "0" for f in frac_s], dtype=object).astype(np.uint64)
        scale = np.where(lens > 0, 10 ** np.clip(9 - lens, 0, 9), 1).astype(np.uint64)
        return np.where(lens > 0, sec * np.uint64(1_000_000_000) + frac * scale, sec)

    def _table(self, cols: list[tuple], events: np.ndarray, cpu: np.ndarray, seq: np.ndarray, keep: np.ndarray,
               decoded: dict[str, tuple[np.ndarray, Fields]]) -> pa.Table:
        idx = np.flatnonzero(keep)
        tid = np.array([cols[_G["tid"]][i] for i in idx], dtype=object).astype(np.int64)
        tgid_s = [cols[_G["tgid"]][i] for i in idx]
        tgid_known = np.fromiter((t.isdigit() for t in tgid_s), bool, len(tgid_s))
        tgid = np.array([t if k else "0" for t, k in zip(tgid_s, tgid_known)], dtype=object).astype(np.int64)
        pos = np.full(len(events), -1, np.int64)
        pos[idx] = np.arange(len(idx))
        n = len(idx)
        values: dict[str, np.ndarray] = {}
        valid: dict[str, np.ndarray] = {}
        for name, (rows, fields) in decoded.items():
            at = pos[rows]
            for fname, column in EVENTS_BY_NAME[name].tracefs:
                vals = fields.get(fname)
                if vals is None:
                    continue
                if column not in values:
                    values[column] = np.zeros(n, _NP_TYPES[column])
                    valid[column] = np.zeros(n, bool)
                known = np.array([v is not None for v in vals], bool)
                values[column][at[known]] = np.array([v for v in vals if v is not None], dtype=object).astype(
                    _NP_TYPES[column]) if known.any() else []
                valid[column][at[known]] = True
        self._fill_vcpu(tid, values, valid, n)
        event_codes = np.array([_EVENT_INDEX[e] for e in events[idx]], np.int16)
        common = {
            "ts_ns": pa.array(self._timestamps(cols, idx), pa.uint64()),
            "cpu": pa.array(cpu[idx].astype(np.uint16)),
            "seq": pa.array(seq[idx].astype(np.uint32)),
            "pid": pa.array(np.where(tgid_known, tgid, tid).astype(np.int32)),
            "tid": pa.array(tid.astype(np.int32)),
            "vm": pa.array(tgid.astype(np.uint64), mask=~tgid_known),
            "event": pa.DictionaryArray.from_arrays(pa.array(event_codes), _EVENT_DICTIONARY),
        }
        arrays = []
        for f in ARROW_SCHEMA:
            if f.name in common:
                arrays.append(common[f.name])
            elif f.name in values:
                arrays.append(pa.array(values[f.name], type=f.type, mask=~valid[f.name]))
            else:
                arrays.append(pa.nulls(n, f.type))
        table = pa.Table.from_arrays(arrays, schema=ARROW_SCHEMA)
        self.stats.events += table.num_rows
        if self.tgid is not None:
            mine = pc.equal(table["pid"], self.tgid)
            self.stats.filtered_out += table.num_rows - pc.sum(mine).as_py()
            self.stats.events -= table.num_rows - pc.sum(mine).as_py()
            table = table.filter(mine)
        return table.sort_by([(c, "ascending") for c in SORT_COLUMNS])

    def _fill_vcpu(self, tid: np.ndarray, values: dict, valid: dict, n: int) -> None:
        """A vCPU runs on one thread: rows of a thread that printed a vcpu id get that vcpu."""
        if "vcpu" not in values:
            values["vcpu"], valid["vcpu"] = np.zeros(n, np.int32), np.zeros(n, bool)
        vcpu, has = values["vcpu"], valid["vcpu"]
        for t, v in zip(tid[has].tolist(), vcpu[has].tolist()):
            self._vcpu_of_tid[t] = v
        if self._vcpu_of_tid:
            missing = np.flatnonzero(~has)
            known = [(i, self._vcpu_of_tid.get(t)) for i, t in zip(missing.tolist(), tid[missing].tolist())]
            for i, v in known:
                if v is not None:
                    vcpu[i], has[i] = v, True


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def read_chunks(path: Path, lines_per_chunk: int = CHUNK_LINES) -> Iterator[str]:
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
            while True:
                lines = stream.readlines(lines_per_chunk * 100)
                if not lines:
                    return
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


def parse_file(path: Path, tgid: int | None = None, kernel: str | None = None) -> ParsedText:
    """Parse a whole capture into one table (for captures that fit in memory; import streams)."""
    parser = TextParser(tgid=tgid, kernel=kernel)
    tables = list(iter_tables(Path(path), parser))
    table = pa.concat_tables(tables) if tables else ARROW_SCHEMA.empty_table()
    if len(tables) > 1:
        table = table.sort_by([(c, "ascending") for c in SORT_COLUMNS])
    return ParsedText(table, parser.stats)


def parse_text(text: str, tgid: int | None = None, kernel: str | None = None) -> ParsedText:
    """Parse text held in memory (tests, small captures)."""
    parser = TextParser(tgid=tgid, kernel=kernel)
    table = parser.parse_chunk(text if text.endswith("\n") else text + "\n")
    return ParsedText(table, parser.stats)
