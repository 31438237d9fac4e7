"""A small reader of the kernel's BTF (``/sys/kernel/btf/vmlinux``): struct member offsets and
tracepoint prototypes of the running kernel.

The only kernel headers on a host may belong to another release (this host has 6.1's headers and
runs 6.18), so the probes never take a layout from a header: every ``struct.member`` they read is
resolved here, at start-up, from the running kernel's own type information.  Format:
Documentation/bpf/btf.rst (header, type section, string section).
"""

from __future__ import annotations

import enum
import functools
import struct
from dataclasses import dataclass
from pathlib import Path

from mmutrace.errors import HostError

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F


class Kind(enum.IntEnum):
    """BTF_KIND_* (include/uapi/linux/btf.h)."""

    UNKN = 0
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


#: Bytes that follow ``struct btf_type`` for each kind: fixed part, per-``vlen`` part.
_EXTRA: dict[Kind, tuple[int, int]] = {
    Kind.INT: (4, 0), Kind.ARRAY: (12, 0), Kind.STRUCT: (0, 12), Kind.UNION: (0, 12),
    Kind.ENUM: (0, 8), Kind.FUNC_PROTO: (0, 8), Kind.VAR: (4, 0), Kind.DATASEC: (0, 12),
    Kind.DECL_TAG: (4, 0), Kind.ENUM64: (0, 12),
}
#: Kinds that only qualify or rename another type (``size_type`` is the target type id).
_MODIFIERS = {Kind.TYPEDEF, Kind.VOLATILE, Kind.CONST, Kind.RESTRICT, Kind.TYPE_TAG}


@dataclass(frozen=True)
class BtfType:
    """One ``struct btf_type`` and where its kind-specific data starts in the type section."""

    kind: Kind
    name: str
    vlen: int
    kind_flag: bool
    size_type: int  # size for INT/STRUCT/UNION/ENUM, referenced type id otherwise
    data: int  # offset of the trailing data in the raw BTF blob


@dataclass(frozen=True)
class Member:
    """A resolved ``struct.member`` path: byte offset from the outer struct and byte size."""

    path: str
    offset: int
    size: int


class Btf:
    """The parsed types of one BTF blob, or of a module's split BTF on top of ``base`` (vmlinux).

    Split BTF continues the base's type ids and string offsets, so the two are parsed into one
    table: base types first, the module's after (the nested lab's kernels build KVM as a module).
    """

    def __init__(self, raw: bytes, base: Btf | None = None) -> None:
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from("<HBBIIIII", raw)
        if magic != BTF_MAGIC:
            raise HostError(f"kernel BTF has a bad magic {magic:#x} (expected {BTF_MAGIC:#x})")
        shift = len(base._raw) if base else 0
        self._raw = (base._raw if base else b"") + raw
        self._strings = (base._strings if base else b"") + raw[hdr_len + str_off: hdr_len + str_off + str_len]
        self.types: list[BtfType | None] = list(base.types) if base else [None]  # type id 0 is void
        self._by_name: dict[tuple[Kind, str], int] = dict(base._by_name) if base else {}
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            name_off, info, size_type = struct.unpack_from("<III", raw, pos)
            kind, vlen = Kind((info >> 24) & 0x1F), info & 0xFFFF
            fixed, per = _EXTRA.get(kind, (0, 0))
            name = self._string(name_off)
            self.types.append(BtfType(kind, name, vlen, bool(info >> 31), size_type, shift + pos + 12))
            if name:
                self._by_name.setdefault((kind, name), len(self.types) - 1)
            pos += 12 + fixed + per * vlen

    def _string(self, off: int) -> str:
        return self._strings[off: self._strings.index(b"\0", off)].decode()

    def find(self, kind: Kind, name: str) -> int:
        """Type id of the named type of ``kind``; HostError if this kernel has none."""
        try:
            return self._by_name[(kind, name)]
        except KeyError:
            raise HostError(f"the running kernel's BTF has no {kind.name.lower()} {name!r}") from None

    def resolve(self, type_id: int) -> int:
        """Strip typedefs and qualifiers."""
        while (t := self.types[type_id]) is not None and t.kind in _MODIFIERS:
            type_id = t.size_type
        return type_id

    def size_of(self, type_id: int) -> int:
        """Byte size of a type (pointers are 8 bytes on x86-64)."""
        t = self.types[self.resolve(type_id)]
        if t is None:
            return 0
        if t.kind == Kind.PTR:
            return 8
        if t.kind == Kind.ARRAY:
            elem, _index, nelems = struct.unpack_from("<III", self._raw, t.data)
            return self.size_of(elem) * nelems
        return t.size_type

    def members(self, type_id: int) -> list[tuple[str, int, int, int]]:
        """(name, type id, bit offset, bitfield size) of a struct/union's members."""
        t = self.types[type_id]
        out = []
        for i in range(t.vlen):
            name_off, mtype, offset = struct.unpack_from("<III", self._raw, t.data + 12 * i)
            bits = offset >> 24 if t.kind_flag else 0
            out.append((self._string(name_off), mtype, offset & 0xFFFFFF if t.kind_flag else offset, bits))
        return out

    def _member(self, type_id: int, name: str) -> tuple[int, int, int] | None:
        """(type id, bit offset, bitfield size) of ``name`` in a struct/union, looking through
        anonymous struct/union members as C does."""
        for mname, mtype, bit_off, bits in self.members(type_id):
            if mname == name:
                return mtype, bit_off, bits
            inner = self.resolve(mtype)
            if not mname and self.types[inner].kind in (Kind.STRUCT, Kind.UNION):
                if (found := self._member(inner, name)) is not None:
                    return found[0], bit_off + found[1], found[2]
        return None

    def member(self, path: str) -> Member:
        """Resolve ``"struct.member[.member...]"`` (e.g. ``"kvm.arch.n_used_mmu_pages"``) to its byte
        offset from the start of the outer struct and its size.

        Raises HostError naming the path when a member is missing or is a bitfield (a byte read
        cannot return it).
        """
        struct_name, *names = path.split(".")
        type_id = self.find(Kind.STRUCT, struct_name)
        bit_offset = 0
        for name in names:
            type_id = self.resolve(type_id)
            if self.types[type_id].kind not in (Kind.STRUCT, Kind.UNION):
                raise HostError(f"{path}: {name!r} is not inside a struct in the running kernel's BTF")
            found = self._member(type_id, name)
            if found is None:
                raise HostError(f"the running kernel has no {path} (BTF of {struct_name} lacks {name!r})")
            type_id, off, bits = found
            if bits or off % 8:
                raise HostError(f"{path} is a bitfield in the running kernel; the probes cannot read it")
            bit_offset += off
        return Member(path, bit_offset // 8, self.size_of(type_id))

    def type_name(self, type_id: int) -> str:
        """A C-like spelling of a type, enough to compare prototypes (``struct kvm_vcpu *``)."""
        t = self.types[type_id]
        if t is None:
            return "void"
        if t.kind == Kind.PTR:
            return self.type_name(t.size_type) + " *"
        if t.kind in (Kind.CONST, Kind.VOLATILE, Kind.RESTRICT, Kind.TYPE_TAG):
            return self.type_name(t.size_type)
        if t.kind in (Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64):
            return f"{t.kind.name.lower().rstrip('64')} {t.name}"
        return t.name

    def tracepoint_args(self, event: str) -> list[str]:
        """The TP_PROTO argument types of a tracepoint, from its ``btf_trace_<event>`` typedef
        (a pointer to a function whose first argument is the ``void *`` tracepoint data)."""
        ptr = self.types[self.resolve(self.find(Kind.TYPEDEF, f"btf_trace_{event}"))]
        proto = self.types[ptr.size_type]
        args = [struct.unpack_from("<II", self._raw, proto.data + 8 * i)[1] for i in range(proto.vlen)]
        return [self.type_name(a) for a in args[1:]]


@functools.cache
def vmlinux() -> Btf:
    """The running kernel's BTF, parsed once per process."""
    try:
        raw = VMLINUX_BTF.read_bytes()
    except OSError as exc:
        raise HostError(f"cannot read {VMLINUX_BTF} ({exc.strerror}); the kernel needs CONFIG_DEBUG_INFO_BTF") from None
    base = Btf(raw)
    kvm_module = VMLINUX_BTF.parent / "kvm"
    return Btf(kvm_module.read_bytes(), base) if kvm_module.exists() else base
