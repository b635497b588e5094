"""Exception classes for everything a user can get wrong: paths, checkpoints, data, architectures.

Messages follow one shape: ``{path}: {what is wrong}; expected {x}, got {y}. {what to do}``.
Each class subclasses the builtin that callers would already catch (``ValueError`` or
``OSError``), so generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "TapError",
    "HubError",
    "CheckpointNotFoundError",
    "CheckpointExistsError",
    "CorruptCheckpointError",
    "ChecksumMismatchError",
    "FormatVersionError",
    "RoutingTableMismatchError",
    "UnsupportedArchitectureError",
    "CalibrationDataError",
    "InvalidConfigError",
]


class TapError(Exception):
    """Base class of every error TAP raises on purpose."""


class CheckpointNotFoundError(TapError, FileNotFoundError):
    """A checkpoint directory, repo or a file it must contain does not exist."""


class CheckpointExistsError(TapError, FileExistsError):
    """The output directory already exists and overwriting was not asked for."""


class CorruptCheckpointError(TapError, ValueError):
    """A shard or JSON file is truncated, unparsable or holds tensors of the wrong shape/dtype."""


class ChecksumMismatchError(CorruptCheckpointError):
    """A shard's sha256 differs from the one recorded in the routing table."""


class FormatVersionError(TapError, ValueError):
    """The checkpoint was written in a format version this runtime does not read."""


class RoutingTableMismatchError(TapError, ValueError):
    """The routing table describes a different model than the config or shards beside it."""


class UnsupportedArchitectureError(TapError, ValueError):
    """The model family has no entry in ``tap_runtime.architectures``."""


class CalibrationDataError(TapError, ValueError):
    """Calibration data is missing, unreadable or too short for the samples asked."""


class InvalidConfigError(TapError, ValueError):
    """An option given by the user is out of range or inconsistent with another."""


class HubError(TapError, RuntimeError):
    """A Hub upload or download failed (authentication, missing repo, connection)."""
