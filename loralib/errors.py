"""Errors that lorareg reports to users.

Every error a user can cause (a bad file, a wrong argument, a mismatch between adapters) is a
:class:`LoraError`. Its ``str()`` is one line: what is wrong, then what to do about it. The CLI
prints that line and exits non-zero; it never shows a traceback for these.

Where a standard exception means the same thing, the error is one too, so code that does not
know lorareg can catch it: a missing input is a :class:`FileNotFoundError`, an existing output a
:class:`FileExistsError`, a bad value or an unreadable file a :class:`ValueError`. The cause of
an error (a JSON error, an OS error) is kept as ``__cause__``.
"""

from __future__ import annotations


class LoraError(Exception):
    """Base class of all user-facing lorareg errors.

    ``message`` says what is wrong; ``hint`` (optional) says what to do.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message.rstrip(".")
        self.hint = hint

    def __str__(self) -> str:
        text = self.message
        if self.hint:
            text = f"{text}. {self.hint.rstrip('.')}."
        return " ".join(text.split())


class InputNotFoundError(LoraError, FileNotFoundError):
    """A path, catalog name or repository that does not exist."""


class CorruptFileError(LoraError, ValueError):
    """A file that is truncated, damaged or not in the format its name claims."""


class NotALoraError(LoraError, ValueError):
    """A readable file that holds something other than a LoRA adapter."""


class UnsupportedFormatError(LoraError, ValueError):
    """A recognised adapter kind that the requested operation cannot handle."""


class UnsafeFileError(LoraError):
    """A pickle-based file that would have to be unpickled to be read."""


class MismatchError(LoraError, ValueError):
    """Inputs that cannot be combined: different architectures or module shapes."""


class OutputExistsError(LoraError, FileExistsError):
    """An output path that exists and would be overwritten without ``force``."""


class InvalidArgumentError(LoraError, ValueError):
    """An argument with a value that cannot work."""
