"""Which L1 kernel the lab boots: the two Debian kernels by short name, or any bzImage by path.

The release is read from the bzImage's own header (not the file name), because the L1 guest loads
``kvm_amd`` from the host's ``/lib/modules/RELEASE`` and bcc compiles against
``/lib/modules/RELEASE/build``: both must match the image exactly.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mmutrace.errors import HostError, UsageError

#: Where merged header trees for bcc in L1 live: beside Debian's header packages, because virtme-ng
#: does not show the host's /var/cache inside the guest (checked: bcc's chdir there fails in L1).
HEADER_CACHE = Path("/usr/src/mmutrace")

#: Short names accepted by ``--kernel``: the Debian images the lab is known to work with.
KNOWN_KERNELS: dict[str, str] = {
    "6.1": "6.1.0-56-amd64",
    "6.12": "6.12.107+deb12-amd64",
}
#: Debian packages that provide each known kernel's image and bcc headers.
KERNEL_PACKAGES: dict[str, tuple[str, str]] = {
    "6.1": ("linux-image-amd64", "linux-headers-amd64"),
    "6.12": ("linux-image-6.12.107+deb12-amd64-unsigned", "linux-headers-6.12.107+deb12-amd64"),
}

# x86 boot protocol (Documentation/arch/x86/boot.rst): "HdrS" at 0x202, kernel_version at 0x20e.
_BOOT_MAGIC_OFFSET = 0x202
_BOOT_MAGIC = b"HdrS"
_KERNEL_VERSION_PTR = 0x20E


@dataclass(frozen=True)
class KernelImage:
    """A bootable L1 kernel and where its modules and headers live on the (shared) root filesystem."""

    image: Path
    release: str
    version_banner: str

    @property
    def modules_dir(self) -> Path:
        return Path("/lib/modules") / self.release

    @property
    def headers_dir(self) -> Path:
        """What bcc inside L1 compiles against (the -amd64 headers package links it here)."""
        return self.modules_dir / "build"

    @property
    def has_headers(self) -> bool:
        return (self.headers_dir / "include").is_dir()

    @property
    def bcc_headers(self) -> Path:
        """A merged header tree for BCC_KERNEL_SOURCE (see ensure_bcc_headers)."""
        return HEADER_CACHE / f"headers-{self.release}"


def ensure_bcc_headers(kernel: KernelImage) -> Path | None:
    """Merge Debian's -common and -amd64 header trees into one folder of symlinks, once.

    bcc compiles against ``BCC_KERNEL_SOURCE`` and needs both halves in one tree (Debian splits
    them; ./run.sh does the same for the host's kernel).  L1 shares this filesystem, so the tree
    built here is the one bcc uses inside L1.  None when the kernel has no headers installed.
    """
    tree = kernel.bcc_headers
    if (tree / ".complete").exists():
        return tree
    arch = kernel.headers_dir.resolve()
    common = arch.with_name(arch.name.removesuffix("-amd64") + "-common")
    if not (arch / "include").is_dir() or not common.is_dir():
        return None
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    for src in (common, arch):
        proc = subprocess.run(["cp", "-as", "--remove-destination", f"{src}/.", f"{tree}/"], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise HostError(f"cannot build the bcc header tree {tree}: {proc.stderr.strip()}")
    (tree / ".complete").touch()
    return tree


def read_bzimage_release(image: Path) -> tuple[str, str]:
    """(release, full banner) from a bzImage's header; UsageError if the file is not a bootable kernel."""
    try:
        head = image.read_bytes()[:0x10000]
    except OSError as exc:
        raise UsageError(f"kernel image {image}: {exc.strerror}") from None
    if head[_BOOT_MAGIC_OFFSET:_BOOT_MAGIC_OFFSET + 4] != _BOOT_MAGIC:
        raise UsageError(f"{image} is not a bootable x86 kernel image (no 'HdrS' boot header)")
    ptr = struct.unpack_from("<H", head, _KERNEL_VERSION_PTR)[0] + 0x200
    banner = head[ptr:ptr + 256].split(b"\0", 1)[0].decode("ascii", "replace")
    release = banner.split(" ", 1)[0]
    if not release:
        raise UsageError(f"{image} has no kernel version string in its boot header")
    return release, banner


def resolve_kernel(name: str) -> KernelImage:
    """``6.1``, ``6.12`` or a path to a bzImage → the image, checked to be bootable with modules."""
    if name in KNOWN_KERNELS:
        image = Path("/boot") / f"vmlinuz-{KNOWN_KERNELS[name]}"
        if not image.exists():
            pkg = KERNEL_PACKAGES[name][0]
            raise UsageError(f"kernel {name}: {image} is missing (Debian package {pkg}; run 'mmutrace lab setup')")
    elif "/" in name or Path(name).exists():
        image = Path(name)
        if not image.is_file():
            raise UsageError(f"kernel image {image} does not exist")
    else:
        raise UsageError(f"unknown kernel {name!r}: use {' or '.join(KNOWN_KERNELS)} or a path to a bzImage")
    release, banner = read_bzimage_release(image)
    kernel = KernelImage(image=image, release=release, version_banner=banner)
    if not (kernel.modules_dir / "modules.dep").exists():
        raise UsageError(f"kernel {release}: no modules in {kernel.modules_dir} (L1 loads kvm_amd from there)")
    return kernel
