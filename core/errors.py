"""The exception hierarchy: every error retouch raises on purpose derives from RetouchError.

Builtin bases are kept where one fits, so callers that catch ValueError or FileNotFoundError
still work. Messages name the file, row or setting at fault and the fix.
"""

from __future__ import annotations


class RetouchError(Exception):
    """Base of every deliberate retouch error."""


class ConfigError(RetouchError, ValueError):
    """A setting is missing, mistyped or out of range."""


class DataError(RetouchError, ValueError):
    """Input data (an image, a Parquet file, a folder) cannot be used as given."""


class ModelError(RetouchError, ValueError):
    """A model name, weights file or architecture does not fit."""


class CheckpointMismatch(ModelError):
    """A checkpoint (e.g. a hypernetwork) belongs to another base model."""


class EditError(RetouchError, ValueError):
    """An edit request is invalid; raised before any weight changes."""


class LedgerIntegrityError(RetouchError):
    """A ledger entry or its delta file is missing or does not match its recorded hash."""


class RegistryError(RetouchError):
    """The model registry (MLflow) is unreachable, locked or inconsistent."""


class FlowLockedError(RetouchError):
    """Another nightly run holds the edit lock."""
