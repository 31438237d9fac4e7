"""Errors a user can act on.

Every failure caused by the host, the input files or the command line is raised as an
``MmutraceError`` (or a subclass).  The CLI turns it into exactly one line on stderr and exit
status 2 (``diff`` keeps 1 for "different", like diff(1)); it never prints a traceback for them.
"""


class MmutraceError(Exception):
    """A failure the user can fix; the message is the whole explanation, one line."""

    exit_code = 2


class HostError(MmutraceError):
    """The host lacks something recording needs (root, /dev/kvm, tracefs, bcc, headers)."""


class TraceFileError(MmutraceError):
    """A trace file is missing, corrupt, truncated or of an unknown schema version."""


class UsageError(MmutraceError):
    """Bad arguments: unknown scenario or event, out-of-range size, unwritable output."""
