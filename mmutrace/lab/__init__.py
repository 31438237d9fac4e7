"""The nested lab: real upstream KVM (TDP MMU or SVM shadow MMU) inside a QEMU-TCG guest.

This host's KVM (PVM backend, ``tdp_mmu=N``) never runs the TDP MMU.  The lab boots a stock Debian
kernel under QEMU with pure emulation and an AMD CPU model exposing SVM + NPT; inside that L1 guest
``kvm_amd`` loads and the L1 kernel's own KVM runs the built-in scenarios while the recorder runs
there too.  ``kernels`` resolves the L1 kernel, ``setup`` installs and checks what the lab needs
(``lab_status`` is what ``mmutrace doctor`` reports), ``run`` boots L1 and collects the traces,
``inside`` is the program that runs inside L1.
"""

from mmutrace.lab.setup import lab_status

__all__ = ["lab_status"]
