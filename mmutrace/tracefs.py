"""tracefs: mounting it, and the kvm/kvmmmu event directories the recorder and tests need."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from mmutrace.errors import HostError

TRACEFS = Path("/sys/kernel/tracing")


def ensure_mounted() -> Path:
    """Return the tracefs mount point, mounting it first when absent (needs root).

    Returns the path; raises HostError with the fix when it cannot be mounted.
    """
    if (TRACEFS / "events").is_dir():
        return TRACEFS
    if os.geteuid() != 0:
        raise HostError(f"tracefs is not mounted at {TRACEFS} and mounting it needs root")
    proc = subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True, text=True)
    if proc.returncode != 0 or not (TRACEFS / "events").is_dir():
        raise HostError(f"cannot mount tracefs at {TRACEFS}: {proc.stderr.strip() or 'mount failed'}")
    return TRACEFS
