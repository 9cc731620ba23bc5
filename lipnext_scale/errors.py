"""The one base class of the library's user-facing errors.

Each component keeps its own error class (ConfigError, StorageError, CheckpointError, ...) with its old
built-in base as well (`class ConfigError(LipnextError, ValueError)`), so `except ValueError` still works;
the `lipnext` console script catches LipnextError in one place (`lipnext_scale.cli.run_command`) and prints
`lipnext <command>: error: <message>` instead of a traceback.
"""

from __future__ import annotations


class LipnextError(Exception):
    """A user-facing error whose message is one line naming the thing that was wrong and the fix. The CLI
    prints it as `lipnext <command>: error: <message>` and exits with `exit_code`: 2, bad input or refused weights
    (RunFailed: 1)."""

    exit_code = 2


class RunFailed(LipnextError):
    """The input was fine but the run did not do its job (the loss diverged, no checkpoint was certified): the
    message says where its outputs are and what to change. Exit code 1."""

    exit_code = 1
