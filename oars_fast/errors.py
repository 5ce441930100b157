"""The error types the CLI turns into one clear line and an exit code (no traceback).

* :class:`UserError` (exit 2): the user's input is wrong or missing: a config value, a file or folder
  that does not exist, a checkpoint that cannot be loaded, a device that is not there. The message
  says what is wrong and how to fix it.
* :class:`TrainingDiverged` (exit 1): training stopped after too many consecutive non-finite steps;
  nothing was exported and the newest complete checkpoint is the last good one.

Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class OarsError(Exception):
    """Base of the errors the CLI reports as one line; `exit_code` is what the process returns."""

    exit_code = 1


class UserError(OarsError):
    """Bad input from the user (config, paths, devices, checkpoints)."""

    exit_code = 2


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or a default path) does not exist or is incomplete."""


class TrainingDiverged(OarsError):
    """Too many consecutive non-finite steps: the run stopped without exporting."""

    exit_code = 1
