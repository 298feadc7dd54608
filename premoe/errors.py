"""User-facing errors.

Every error premoe raises for bad input is a :class:`PremoeError`: one line that names the
problem and the fix. The CLI prints it as ``premoe: error: ...`` and exits with status 2; library
users can catch it (it also subclasses the matching builtin, e.g. ``ValueError``).
"""

from __future__ import annotations


class PremoeError(Exception):
    """Base class of every error premoe raises on bad input."""


class InputError(PremoeError, ValueError):
    """Malformed or impossible arguments (keep counts, task names, data lines)."""


class MissingFileError(PremoeError, FileNotFoundError):
    """A required file or directory does not exist."""


class UnsupportedModelError(PremoeError, ValueError):
    """The checkpoint's architecture is not in the adapter table."""


class StoreError(PremoeError, ValueError):
    """A pattern store is missing, corrupt, or belongs to another model."""


class CheckpointError(PremoeError, ValueError):
    """A checkpoint is corrupt or does not match its config."""
