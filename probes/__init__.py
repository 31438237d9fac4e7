"""BPF probes of the KVM MMU for `mmutrace record` (bcc).

- ``mmu_events.bpf.c``: raw tracepoints on every kvmmmu event and the MMU's kvm events, syscall
  tracepoints on KVM ioctls; fixed-size records into one BPF ring buffer.
- ``btf.py``: kernel struct layouts and tracepoint prototypes from /sys/kernel/btf/vmlinux.
- ``layout.py``: the record's bytes and which schema column each slot holds, per event.
- ``loader.py``: compiles the C with the running kernel's offsets, attaches it, reads its counters.
"""
