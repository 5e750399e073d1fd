"""A stage worker process, started by the front or by hand.

The front starts `python -m pspnet.stages.worker STAGE INDEX` and writes the worker's start-up
document (config and addresses, JSON) to its stdin: no pickle, and nothing of the front's
state. `pspnet worker` calls `run` directly, joining a daemon over tcp from another host.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import sys

from pspnet.core.config import Addresses, PipelineConfig, read_start_document
from pspnet.core.keys import Keys
from pspnet.core.pipeline import Stage, spec_of
from pspnet.core.trust import Trust
from pspnet.stages.child import Child

PR_SET_PDEATHSIG = 1


def run(stage: Stage, index: int, cfg: PipelineConfig, addrs: Addresses, trust: Trust,
        keys: Keys | None, supervised: bool) -> None:
    """Run one worker until it is stopped (`keys`: CurveZMQ, with tcp): the stage's module
    (core.pipeline's table) is imported here, so a worker loads only its own stage's
    libraries."""
    spec = spec_of(Stage(stage))
    child = Child(spec.stage, index, cfg, addrs, trust, keys, supervised=supervised)
    importlib.import_module(spec.module).main(child)


def main() -> None:
    """A worker the front started. A Ctrl-C, `timeout` or systemd stop reaches the whole
    process group; the draining front still needs its workers, so they ignore it and the
    front stops them itself (STOP_SIGNAL). If the front dies, the kernel ends them."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    stage, index = Stage(sys.argv[1]), int(sys.argv[2])
    cfg, addrs, front_pid, trust, curve = read_start_document(sys.stdin.read())
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass                           # not Linux: Child.tick's parent check still holds
    if os.getppid() != front_pid:
        sys.exit(1)                    # the front died before the prctl took hold
    run(stage, index, cfg, addrs, trust,
        None if curve is None else Keys.from_document(curve), supervised=True)


if __name__ == "__main__":
    main()
