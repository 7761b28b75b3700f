"""Errors the user can fix. Each message names the file or setting and says what to do.

Every such error derives from :class:`UserError`; the ``rmae`` command turns any of them into
one line ``rmae <command>: error: <message>`` and exit status 2, never a traceback. Packages
built on rmae (``analysis``, ``dashboards``) derive their own errors from it too.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (a file, a setting, data) rather than a bug."""


class CheckpointError(UserError):
    """A checkpoint could not be read or does not fit; the message names the file and the fix."""


class RunFolderError(CheckpointError):
    """A run folder is missing, malformed, busy, or is not an rmae run."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or inf; the run folder keeps its last good checkpoint."""
