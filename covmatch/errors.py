"""Errors that carry one clear, user-facing line (the command-line tools print it and exit with code 2)."""

__all__ = ["CovMatchError", "DataError", "ConfigError", "CheckpointError"]


class CovMatchError(ValueError):
    """Base class: bad input from the user (a file, a flag, a setting), reported in one line."""


class DataError(CovMatchError):
    """A dataset file, entry or image is missing, unreadable or malformed."""


class ConfigError(CovMatchError):
    """Settings that contradict each other or the files they point at."""


class CheckpointError(CovMatchError):
    """A checkpoint or saved synthetic set that is truncated, corrupt or does not match the run."""
