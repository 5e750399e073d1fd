"""The one exception type `pspnet build` turns into a one-line error and exit status 2."""

from __future__ import annotations


class BuildError(Exception):
    """A problem with the user's input (file, config, checkpoint, sizes), not a bug.

    The CLI prints `pspnet build: error: <message>` and exits 2, without a traceback, so
    keep the message to one line that says what to change.
    """
