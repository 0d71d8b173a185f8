"""The project's error types: faults in what a user gave (a file, a name, an option, a config value).

The command line prints these, and OSErrors (a missing or unwritable file), as one line with exit code
2; any other exception is a bug and keeps its traceback. Each type also derives from the builtin error
its callers have always caught (ValueError, KeyError, OSError), so `except ValueError` still works.
"""

from __future__ import annotations


class SwinV2Error(Exception):
    """Base of the errors the command line reports as one line: the message names what is wrong."""


class InputError(SwinV2Error, ValueError):
    """A value, option or file content that does not fit (an image size, a precision, a class map)."""


class UnknownNameError(SwinV2Error, KeyError):
    """A name that is not in a table (a model variant, a weights tag)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(InputError):
    """A recipe or override that does not fit the schema; the message names the dotted key.

    `key` is the dotted key at fault where there is one (e.g. 'stages[0].train.epochs') and `reason`
    what is wrong with it, so that load_config can restate a fault as the override's that caused it.
    """

    def __init__(self, message: str, *, key: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.reason = message if reason is None else reason


class DataError(InputError):
    """A data folder or image that cannot be used; the message names the folder or file."""


class CheckpointError(SwinV2Error, OSError):
    """A checkpoint, weights or output file that cannot be read or written; the message names the file.

    An `OSError` because every cause is a property of a file (missing, torn, full disk, unsafe).
    """


class UnsafeCheckpointError(CheckpointError):
    """A pickle that needs a global outside torch's weights-only allow-list; nothing was executed."""


class UnreadableFileError(CheckpointError):
    """A file that is there but cannot be read now (permissions, an I/O error, a stale network mount):
    not a torn file, so never skipped as one; whatever needed it stops, touching nothing."""
