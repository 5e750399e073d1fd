"""CPU time per thread of the pipeline's processes, read from /proc (Linux only).

Why per thread: a stage's total CPU per image says how many cores it needs, but one
process of it cannot go faster than its busiest thread allows (a Python thread holds the
GIL; a ZeroMQ I/O thread copies every frame its sockets carry). So the thread with the
most CPU per image names the ceiling that more workers or cores will not lift: 1000 / its
ms per image.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pspnet.core.status import Status

Snapshot = dict[tuple[str, int], tuple[str, float]]    # (process, tid) -> (thread, cpu s)


def pipeline_pids(status: Status) -> dict[str, int]:
    """'front' (this process) and '<stage>-<k>' for each child alive in `status`."""
    pids = {"front": os.getpid()}
    for stage, figures in status.stages.items():
        for k, pid in enumerate(figures.pids):
            pids[f"{stage}-{k}"] = int(pid)
    return pids


def snapshot(pids: Mapping[str, int]) -> Snapshot:
    """CPU seconds of every thread of these processes; {} without /proc.

    From `schedstat` (time on a CPU, in ns) where the kernel has it: `stat`'s user and
    system times count whole clock ticks (10 ms), so a short pass of a thread that costs
    0.05 ms per image could read as 0 or twice its cost."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: Snapshot = {}
    for process, pid in pids.items():
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue                          # not Linux, or the process is gone
        for tid in tids:
            task = f"/proc/{pid}/task/{tid}"
            try:
                with open(f"{task}/comm") as f:
                    name = f.read().strip()
                cpu = _thread_cpu_s(task, tick)
            except (OSError, IndexError, ValueError):
                continue
            out[(process, int(tid))] = ("main" if int(tid) == pid else name, cpu)
    return out


def _thread_cpu_s(task: str, tick: int) -> float:
    try:
        with open(f"{task}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        pass                                  # a kernel without CONFIG_SCHED_INFO
    with open(f"{task}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after the ")" that ends the name: state is field 0, utime 11, stime 12
    return (int(fields[11]) + int(fields[12])) / tick


def front_main_ms(before: Snapshot, after: Snapshot, images: int) -> float | None:
    """CPU ms per image of the front's main thread (routing, ledger, answers: the work
    that one Python thread does for every image), None where /proc is not there."""
    if images <= 0:
        return None
    used = [cpu - before.get(key, (name, 0.0))[1] for key, (name, cpu) in after.items()
            if key[0] == "front" and name == "main"]
    return sum(used) * 1e3 / images if used else None


def busiest(before: Snapshot, after: Snapshot, images: int, top: int = 8,
            ) -> list[dict[str, Any]]:
    """The `top` threads by CPU per image over the interval, with the rate each allows.

    Thread names are the OS's: `main`, `ZMQbg/IO/0` (ZeroMQ's I/O thread), `ZMQbg/Reaper`,
    and `python` (any other Python thread: the executor's runner, heartbeats, the front's
    streamers)."""
    if images <= 0:
        return []
    rows = []
    for key, (name, cpu) in after.items():
        used = cpu - before.get(key, (name, 0.0))[1]
        if used > 0:
            ms = used * 1e3 / images
            rows.append({"process": key[0], "thread": name, "ms_per_image": round(ms, 4),
                         "max_img_s": round(1000 / ms, 1)})
    rows.sort(key=lambda r: -r["ms_per_image"])
    return rows[:top]
