"""`mmutrace lab setup` and the lab readiness checks that `mmutrace doctor` reports.

The lab needs QEMU (TCG, so no /dev/kvm), busybox (virtme-ng's initramfs), the two Debian kernel
images with their module trees and headers (the L1 guest shares this root filesystem, so what is
installed here is what L1 loads and compiles against), and virtme-ng in the project's venv.
Installing a linux-image package only adds files under /boot and /lib/modules; this host does not
boot from them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mmutrace.errors import HostError
from mmutrace.lab.kernels import KERNEL_PACKAGES, KNOWN_KERNELS, KernelImage, ensure_bcc_headers, resolve_kernel

QEMU = "qemu-system-x86_64"
VIRTME_PYPI = "virtme-ng"


def venv_bin() -> Path:
    """The bin directory of the environment mmutrace runs from (virtme-ng installs its scripts here)."""
    return Path(sys.prefix) / "bin"


def _exists(path: Path) -> bool:
    """Path.exists() that treats an unreadable directory as absent (doctor runs as any user, and a PATH
    can name directories such as /root/.pyenv/bin that an unprivileged user may not search)."""
    try:
        return path.exists()
    except OSError:
        return False


def vng_path() -> Path | None:
    """`vng`, if virtme-ng is installed with its `virtme-run` beside it (vng execs virtme-run by name)."""
    for directory in [venv_bin(), *map(Path, os.environ.get("PATH", "").split(os.pathsep))]:
        if _exists(directory / "vng") and _exists(directory / "virtme-run"):
            return directory / "vng"
    return None


@dataclass(frozen=True)
class Requirement:
    """One thing the lab needs, whether it is there, and what installs it (an apt package, or None)."""

    check: str
    present: bool
    apt_package: str | None
    fix: str


def _apt(check: str, present: bool, package: str) -> Requirement:
    return Requirement(check, present, package, f"apt-get install {package}  (or: mmutrace lab setup)")


def requirements() -> list[Requirement]:
    """Every lab requirement with its current state (a few file checks: fast enough for doctor)."""
    reqs = [
        _apt(f"{QEMU} (QEMU, TCG)", shutil.which(QEMU) is not None, "qemu-system-x86"),
        _apt("busybox-static (virtme-ng initramfs)", Path("/bin/busybox").exists(), "busybox-static"),
    ]
    for name, release in KNOWN_KERNELS.items():
        image_pkg, headers_pkg = KERNEL_PACKAGES[name]
        kernel = KernelImage(Path("/boot") / f"vmlinuz-{release}", release, "")
        reqs.append(_apt(f"kernel {name}: {kernel.image} and {kernel.modules_dir}",
                         kernel.image.exists() and (kernel.modules_dir / "modules.dep").exists(), image_pkg))
        reqs.append(_apt(f"kernel {name}: headers ({kernel.headers_dir})", kernel.has_headers, headers_pkg))
        reqs.append(Requirement(f"kernel {name}: bcc header tree {kernel.bcc_headers}",
                                (kernel.bcc_headers / ".complete").exists(), None, "mmutrace lab setup"))
    reqs.append(Requirement(f"virtme-ng (vng and virtme-run in {venv_bin()})", vng_path() is not None, None,
                            f"{venv_bin() / 'pip'} install {VIRTME_PYPI}  (or: mmutrace lab setup)"))
    return reqs


def lab_status() -> list[tuple[str, bool, str]]:
    """(check, ok, fix) for each lab requirement: the lab section of `mmutrace doctor`."""
    return [(r.check, r.present, "" if r.present else r.fix) for r in requirements()]


def install(echo=print) -> list[Requirement]:
    """Install what is missing (apt packages, then virtme-ng into this venv); return what is still missing.

    Idempotent: with everything present it runs only the checks.
    """
    missing = [r for r in requirements() if not r.present]
    apt = sorted({r.apt_package for r in missing if r.apt_package})
    if apt:
        if os.geteuid() != 0:
            raise HostError(f"installing {' '.join(apt)} needs root")
        echo(f"lab setup: apt-get install {' '.join(apt)} (kernel images take a few minutes)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        proc = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *apt],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["apt-get failed"])[-1]
            raise HostError(f"apt-get install {' '.join(apt)} failed: {tail}")
    for name in KNOWN_KERNELS:
        kernel = resolve_kernel(name)
        if ensure_bcc_headers(kernel) is None:
            echo(f"lab setup: kernel {name} has no headers; L1 recordings will use the tracefs backend")
    if vng_path() is None:
        echo(f"lab setup: pip install {VIRTME_PYPI} into {sys.prefix}")
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", VIRTME_PYPI], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise HostError(f"pip install {VIRTME_PYPI} failed: {tail}")
    return [r for r in requirements() if not r.present]
