"""Errors that carry one clear, user-facing line; the command-line tools print it and exit with its code."""

from __future__ import annotations

import re
from typing import Mapping, Optional, Tuple

__all__ = [
    "CovMatchError",
    "DataError",
    "ConfigError",
    "CheckpointError",
    "DivergedError",
    "EXIT_BAD_INPUT",
    "EXIT_DIVERGED",
    "brief",
    "one_line",
]

EXIT_BAD_INPUT = 2  # a CovMatchError: the input was refused before anything was changed
EXIT_DIVERGED = 3  # a DivergedError: the run stopped; what it had saved before is intact


class CovMatchError(ValueError):
    """Base class: bad input from the user (a file, a flag, a setting), reported in one line (exit 2)."""


class DataError(CovMatchError):
    """A dataset file, entry or image is missing, unreadable or malformed."""


class ConfigError(CovMatchError):
    """Settings that contradict each other or the files they point at.

    ``field``: the setting the message starts with (``lr_img must be >= 0``), so that a command can name it by
    the flag that sets it instead (``naming``)."""

    def __init__(self, message: str, *, field: Optional[str] = None, mentions: Tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.field = field
        self.mentions = mentions  # other settings the message names, as whole words

    def naming(self, names: Mapping[str, str]) -> ConfigError:
        """This error with its field (where the message starts with it) and the settings it mentions written as
        ``names[...]``, the flags that set them."""
        message = str(self)
        if self.field in names and message.startswith(self.field):
            message = names[self.field] + message[len(self.field) :]
        for other in self.mentions:
            if other in names:
                message = re.sub(rf"(?<![\w-]){re.escape(other)}(?![\w-])", names[other], message, count=1)
        return ConfigError(message, field=self.field, mentions=self.mentions)


class CheckpointError(CovMatchError):
    """A checkpoint or saved synthetic set that is truncated, corrupt or does not match the run."""


class DivergedError(RuntimeError):
    """A run whose loss or state became NaN or infinite. The message says where (iteration or epoch, which
    term) and what to try; the tools print it in one line and exit with code 3, keeping the checkpoints and
    results saved before the failure."""


def brief(err: BaseException, limit: int = 160) -> str:
    """The first line of a library's error message, cut to ``limit`` characters, to quote inside ours."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    text = lines[0].strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(message: object) -> str:
    """``message`` with its line breaks and runs of spaces collapsed: what the tools print."""
    return " ".join(str(message).split())
