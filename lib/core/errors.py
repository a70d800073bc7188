"""The project's error classes: every message names the file/key/layer, the reason and the fix.

The Prefect layer retries only `TransientError`; every `BadInputError` fails at once.
The CLI turns any `TourGuideError` into a one-paragraph message and exit code 2.
"""

from __future__ import annotations

import errno


class TourGuideError(Exception):
    """Base class for errors we raise on purpose (never a bare traceback for the user)."""

    exit_code = 2


class BadInputError(TourGuideError, ValueError):
    """The input (text, file, flag, index, spec, config, checkpoint) is wrong; retrying won't help."""


class ChecksumError(TourGuideError):
    """A shard on disk does not match the sha256 its index row recorded (or is missing)."""


class ModelLoadError(BadInputError):
    """A model or tokenizer could not be loaded (missing folder, hub id while offline, ...)."""


class NotExactError(BadInputError):
    """A transform cannot be folded exactly; pass --allow-inexact to fold it anyway."""


class GateFailedError(TourGuideError):
    """A folded checkpoint does not reproduce its source within tolerance."""


class TransientError(TourGuideError):
    """An I/O or out-of-memory failure worth one more try (the only kind Prefect retries)."""


def is_transient(exc: BaseException) -> bool:
    """True for failures a retry may fix: our TransientError, OS I/O errors other than
    'not found'/'permission', and CUDA out-of-memory. Bad input is never transient."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, BadInputError | ChecksumError | GateFailedError):
        return False
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    if isinstance(exc, OSError) and exc.errno == errno.EROFS:  # a read-only mount stays read-only
        return False
    if isinstance(exc, OSError):
        return True
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(exc).lower()
