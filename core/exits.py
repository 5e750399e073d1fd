"""Every exit status a `pspnet` process ends with, in one table, so that the numbers a
script or supervisor relies on (systemd's RestartPreventExitStatus=3, a CI step) cannot
drift apart between commands. One number, one meaning: add a row before using a new one.
"""

from __future__ import annotations

# name                 code   meaning
EXIT_OK = 0            # ok: everything asked for succeeded
EXIT_FAILED = 1        # failed: a command that ran but failed (an image answered with an
                       # error, nothing scored, a bench error), a serve cut short (second
                       # signal, --drain-timeout, a signal during start-up), an executor
                       # whose device keeps failing (the front restarts it), a failed
                       # build verification
EXIT_USAGE = 2         # usage: bad arguments or input, refused in one line before any work
EXIT_CANNOT_START = 3  # cannot start: serve or one of its children (bad model, no backend,
                       # an internal port in use); a restart would fail the same way
EXIT_UNAVAILABLE = 4   # daemon unavailable: nothing answers at the endpoint
EXIT_INTERRUPTED = 130 # interrupted: Ctrl-C of a client (128 + SIGINT, the shell's own
                       # convention); `pspnet submit` has cancelled what had not started
EXIT_BROKEN_PIPE = 141 # its output's reader went away (`pspnet submit ... | head -1`): it
                       # stops quietly, as a tool killed by SIGPIPE would (128 + SIGPIPE)
