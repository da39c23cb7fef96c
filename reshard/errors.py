"""One error hierarchy. Every message names the file or tensor at fault and what to do.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``; set
``RESHARD_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations


class ReshardError(Exception):
    """Base class of every error reshard raises on purpose."""

    exit_code = 1


class UsageError(ReshardError):
    """An option value that cannot be used (bad size string, conflicting flags)."""

    exit_code = 2


class SourceError(ReshardError):
    """The source cannot be found or resolved (missing path, unknown repo id, offline miss)."""


class FormatError(ReshardError):
    """A checkpoint file or index is malformed: truncated, bad header, inconsistent index."""


class UnsafePickleError(FormatError):
    """A pickle asked for something outside the allow-list; nothing it asked for was run."""


class OutputError(ReshardError):
    """The output cannot be written: exists, inside the source, disk full, no permission."""


class LockedError(OutputError):
    """Another reshard run is writing the same output folder."""


class VerifyError(ReshardError):
    """An output folder does not match its index or its source."""


class HubError(ReshardError):
    """A Hugging Face Hub call failed (auth, access, missing repo or revision, network)."""


class BenchError(ReshardError):
    """A ``reshard bench`` trial failed: the loader's child process crashed or was killed."""
