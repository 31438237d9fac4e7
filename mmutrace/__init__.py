"""mmutrace: record KVM x86 MMU events with eBPF and replay them through models of the shadow and TDP MMUs."""

__version__ = "0.1.0"
