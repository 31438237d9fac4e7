"""The guest program: a command-buffer interpreter, hand-assembled x86-64 that runs at CPL3.

The host computes every access a scenario makes and writes them as ``(op, addr, value)`` u64
triples into the vCPU's command buffer; the guest executes them at native speed, so each access is a
real guest load or store that the shadow MMU must fault in.  Ops:

- ``OP_END`` (0): ``out`` to ``BATCH_PORT`` — KVM_EXIT_IO, the host refills the buffer and re-enters;
  the guest then restarts from the top of the buffer.
- ``OP_READ`` (1): load the qword at ``addr`` (a page fault, an MMIO exit or nothing) and store it
  into the command's ``value`` field, so the host can check what the guest saw.
- ``OP_WRITE`` (2): store ``value`` at ``addr``.

Register use: r15 = guest-virtual address of this vCPU's command buffer (set once by the host, so
several vCPUs share one copy of the code), rsi = cursor, rax/rdx/rcx = op/addr/value.  No stack, no
interrupts, no exceptions: any guest #PF that the guest's own tables cannot satisfy is a triple
fault, reported as KVM_EXIT_SHUTDOWN.
"""

from __future__ import annotations

import numpy as np

OP_END, OP_READ, OP_WRITE = 0, 1, 2
COMMAND = np.dtype([("op", "<u8"), ("addr", "<u8"), ("value", "<u8")])
BATCH_PORT = 0xE0

# (label or None, bytes, jump target or None).  A jump's last byte is its rel8, filled in below.
_PROGRAM: tuple[tuple[str | None, bytes, str | None], ...] = (
    ("start", bytes.fromhex("4c89fe"), None),    # mov rsi, r15        ; cursor = buffer start
    ("loop", bytes.fromhex("488b06"), None),     # mov rax, [rsi]      ; op
    (None, bytes.fromhex("488b5608"), None),     # mov rdx, [rsi+8]    ; addr
    (None, bytes.fromhex("488b4e10"), None),     # mov rcx, [rsi+16]   ; value
    (None, bytes.fromhex("4883c618"), None),     # add rsi, 24
    (None, bytes.fromhex("4883f801"), None),     # cmp rax, OP_READ
    (None, bytes.fromhex("7400"), "read"),       # je read
    (None, bytes.fromhex("4883f802"), None),     # cmp rax, OP_WRITE
    (None, bytes.fromhex("7400"), "write"),      # je write
    (None, bytes([0xE6, BATCH_PORT]), None),     # out BATCH_PORT, al  ; OP_END: exit to the host
    (None, bytes.fromhex("eb00"), "start"),      # jmp start           ; next batch
    ("read", bytes.fromhex("488b02"), None),     # mov rax, [rdx]
    (None, bytes.fromhex("488946f8"), None),     # mov [rsi-8], rax    ; report it in .value
    (None, bytes.fromhex("eb00"), "loop"),       # jmp loop
    ("write", bytes.fromhex("48890a"), None),    # mov [rdx], rcx
    (None, bytes.fromhex("eb00"), "loop"),       # jmp loop
)


def assemble() -> bytes:
    """Lay out ``_PROGRAM`` and resolve its rel8 jumps."""
    offsets, pc = {}, 0
    for label, code, _ in _PROGRAM:
        if label:
            offsets[label] = pc
        pc += len(code)
    out, pc = bytearray(), 0
    for _, code, target in _PROGRAM:
        pc += len(code)
        if target:
            rel = offsets[target] - pc
            assert -128 <= rel < 128
            code = code[:-1] + bytes([rel & 0xFF])
        out += code
    return bytes(out)


INTERPRETER = assemble()


def commands(op: int | np.ndarray, addr: np.ndarray, value: int | np.ndarray = 0) -> np.ndarray:
    """A command array (``COMMAND`` records) from parallel op/addr/value columns."""
    addr = np.asarray(addr, dtype=np.uint64)
    cmds = np.empty(len(addr), dtype=COMMAND)
    cmds["op"], cmds["addr"], cmds["value"] = op, addr, value
    return cmds
