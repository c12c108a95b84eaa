"""One exception family for everything a user can get wrong.

The CLI turns any ``QpeftError`` into one line on stderr and exit code 2; anything else is a bug.
"""


class QpeftError(Exception):
    """Base class of every error caused by bad input (files, arguments, models)."""


class ConfigError(QpeftError, ValueError):
    """Arguments that cannot work: rank too large, unknown task, no module matched, ..."""


class FormatError(QpeftError):
    """A file that is not a valid adapter file (or not the file the reader expected)."""


class BaseMismatchError(QpeftError):
    """An adapter applied to a base model it was not trained on."""
