"""Exception types shared by every part; the CLI maps them to exit codes."""

from __future__ import annotations


class InfercacheError(Exception):
    """An operation failed (exit code 1)."""

    exit_code = 1


class BadInputError(InfercacheError, ValueError):
    """The user gave something unusable: a bad flag value, a missing path (exit code 2)."""

    exit_code = 2
