"""Exceptions shared by every layer; each carries a message an operator can act on."""

from __future__ import annotations


class CmcdError(Exception):
    """Base of cmcd's own errors."""


class ConfigError(CmcdError):
    """The configuration file is unusable; .problems lists every dotted path at fault."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class KeyFileError(CmcdError):
    """A key file is missing, unsafe (readable by others) or does not match the store."""


class StoreError(CmcdError):
    """The store refused an operation (constraint, missing row, bad argument)."""


class NotFound(StoreError):
    """The named tenant, user, domain or queue id does not exist (for this caller)."""


class Conflict(StoreError):
    """The change would collide with what exists (a taken name, an overlapping network, a duplicate)."""


class UntrustedFileError(CmcdError):
    """A store, spool or key file that start-up cannot trust (missing, empty, garbled, corrupt, another's).

    The message is one line, "FILE: what is wrong; what to do", and cmcd does not start.
    """


class SpoolError(CmcdError):
    """The spool could not commit (disk full, I/O error); nothing was written."""


class BackupError(StoreError):
    """A backup of the store could not be taken, read, verified or restored; the store was not changed.

    A StoreError, so the admin socket reports its message as a refusal rather than an internal failure.
    """
