"""How many processes and threads a pipeline runs, from the CPUs it may use and its devices.

Why a plan and not fixed defaults: on a 2-core machine with the demo model, 2 + 2 workers
beside an onnxruntime executor that takes every core and spins while it waits ran slower
than a plain loop (60 img/s against 64 serial); 1 + 1 workers with one executor thread ran
88 img/s. On a 16-core GPU host the same 2 + 2 workers are too few to feed the device. So:

* usable CPUs = the affinity mask, capped by a container's CPU quota (cgroup v2
  `cpu.max`, or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), so a Kubernetes CPU limit
  is honoured;
* an executor that computes on the host's cores (a `cpu` device) gets one intra-op thread
  per usable CPU (shared between host executors) beside one preprocess and one postprocess
  worker per 8 CPUs (at least one each), with spinning off: its idle threads sleep, so a
  worker takes a core when it has work. The network is most of the host's work (the demo
  model: 18 ms of CPU per image against 1.6 decode and 5.8 postprocess), so leaving the
  workers' cores idle cost more than sharing them: on 2 cores `pspnet bench --plans` gave
  68.3 img/s with 2 executor threads against 55.1 with 1, interleaved in one run
  (bench/results/cpu-2core-final-plans.json);
* an executor on a device (cuda, npu, a simulated one) needs one core for its loop; the
  others, less one for the front, go to the workers in proportion to their CPU cost per
  image (decode + letterbox ~2 ms, postprocess ~1.7 ms with the labels head: measured,
  /work/shared/reference/pipeline-notes.md), no more than it takes to reach the front's
  own ceiling;
* idle onnxruntime threads spin only where every thread has a core of its own;
* where a host executor's threads share the cores with the workers, the executor runs as
  Linux SCHED_BATCH (`--backend-option sched=normal` undoes it): a batch scheduled task
  does not preempt others when it wakes, so the workers' short steps are not cut into by
  the network's threads; the demo on 2 cores, six pairs against `sched=normal`: e2e 78.6
  -> 80.4 img/s, the executor's CPU 16.6 -> 16.0 ms per image
  (bench/results/cpu-2core-stop34-sched.json).

Every value a flag sets is kept as given (`given`) and the rest planned around it.
Pure functions over a `Machine`, which `read_machine` fills from this host; tests give
their own.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from pspnet.core.backend_rules import HOST_DEVICES, SIMULATED

CGROUP = Path("/sys/fs/cgroup")
DECODE_MS = 2.0          # CPU ms per image, decode + letterbox of a VOC-sized JPEG
POSTPROCESS_MS = 1.7     # CPU ms per image, postprocess with the labels head
FRONT_IMG_S = 5000       # the front's ceiling (measured ~5,700 img/s): workers past it idle
CPUS_PER_WORKER = 8      # host executor: one worker of each pool per this many CPUs


@dataclass(frozen=True)
class Machine:
    """What the plan reads of a host: CPUs in the affinity mask, and the CPU quota."""

    affinity: int                 # len(os.sched_getaffinity(0))
    quota: float | None = None    # CPUs the cgroup allows per period; None: no limit

    @property
    def cpus(self) -> int:
        """Usable CPUs: the smaller of the two, at least one (a quota of 1.5 is 1)."""
        limit = self.affinity if self.quota is None else min(self.affinity, self.quota)
        return max(1, math.floor(limit))


def cpu_quota(root: Path = CGROUP) -> float | None:
    """The container's CPU limit in CPUs, None when there is none (or no cgroup here).
    cgroup v2: `cpu.max` is "max 100000" (no limit) or "200000 100000" (2 CPUs);
    cgroup v1: cpu.cfs_quota_us (-1: no limit) over cpu.cfs_period_us."""
    try:
        quota, _, period = (root / "cpu.max").read_text().strip().partition(" ")
        return None if quota == "max" else int(quota) / int(period or 100000)
    except (OSError, ValueError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota_us = int((folder / "cpu.cfs_quota_us").read_text())
            period_us = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def read_machine(root: Path = CGROUP,
                 affinity: Callable[[], set[int]] | None = None) -> Machine:
    if affinity is None:
        affinity = getattr(os, "sched_getaffinity", None)
    cpus = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    return Machine(cpus, cpu_quota(root))


@cache
def this_machine() -> Machine:
    """This host, read once per process."""
    return read_machine()


@dataclass(frozen=True)
class Given:
    """What flags set; None: planned."""

    preprocess_workers: int | None = None
    postprocess_workers: int | None = None
    executor_threads: int | None = None    # --backend-option threads=N (0: the library's)
    spinning: bool | None = None           # --backend-option spin=0|1
    sched: str | None = None               # --backend-option sched=batch|normal


@dataclass(frozen=True)
class Plan:
    preprocess_workers: int
    postprocess_workers: int
    executor_threads: int          # intra-op threads per host executor (1 on a device)
    worker_threads: int            # threads of each preprocess/postprocess worker
    spinning: bool                 # idle onnxruntime threads spin
    cpus: int
    affinity: int
    quota: float | None
    backend: str
    devices: tuple[str, ...]
    set_by_flags: tuple[str, ...] = field(default_factory=tuple)
    why: str = ""
    precision: str = ""
    choice: str = ""               # how backend and precision were chosen (--backend auto)
    executor_sched: str = "normal"  # host executors' scheduling class: batch or normal

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["devices"], doc["set_by_flags"] = list(self.devices), list(self.set_by_flags)
        return doc



def describe(plan: Mapping[str, Any]) -> str:
    """A plan's document (Plan.as_dict) in one line, for the start-up log and the bench."""
    chosen = (f"{plan['backend']} {plan.get('precision', '')} on {','.join(plan['devices'])}"
              f" ({plan['choice']}); " if plan.get("choice") else "")
    return (chosen + f"{plan['preprocess_workers']} preprocess + {plan['postprocess_workers']} "
            f"postprocess workers, executor threads "
            f"{plan['executor_threads'] or 'the library default'}, spinning "
            f"{'on' if plan['spinning'] else 'off'}"
            + (", executor scheduled as batch" if plan.get("executor_sched") == "batch"
               else "")
            + (f" (set by flags: {', '.join(plan['set_by_flags'])})"
               if plan["set_by_flags"] else "") + f": {plan['why']}")


def host_executors(backend: str, devices: tuple[str, ...]) -> int:
    """How many executors compute on the host's cores (a simulated device does not)."""
    if backend == SIMULATED:
        return 0
    kinds = [d.strip().lower().partition(":")[0] for d in devices]
    return sum(kind in HOST_DEVICES for kind in kinds)


def make_plan(machine: Machine, backend: str, devices: tuple[str, ...],
              given: Given = Given(), *, precision: str = "", choice: str = "") -> Plan:
    """The plan for this machine, backend and devices, around what flags set."""
    cpus = machine.cpus
    on_host = host_executors(backend, devices)
    seen = (f"{cpus} CPU(s) usable (affinity {machine.affinity}, "
            + ("no quota" if machine.quota is None else f"quota {machine.quota:g}") + ")")
    if on_host:
        pre = given.preprocess_workers or max(1, cpus // CPUS_PER_WORKER)
        post = given.postprocess_workers or max(1, cpus // CPUS_PER_WORKER)
        threads = given.executor_threads if given.executor_threads is not None else \
            max(1, cpus // on_host)
        why = (f"{seen}; {on_host} executor(s) on the host ({backend}): a thread per CPU, "
               f"sleeping while idle, so the workers take a core when they need one")
    else:
        # one core per executor's loop, one for the front; the rest by each pool's cost
        free = max(2, cpus - len(devices) - 1)
        pre = given.preprocess_workers or _pool(free * DECODE_MS / (DECODE_MS + POSTPROCESS_MS),
                                                DECODE_MS)
        post = given.postprocess_workers or _pool(free - pre, POSTPROCESS_MS)
        threads = given.executor_threads if given.executor_threads is not None else 1
        why = (f"{seen}; executor(s) on {', '.join(devices)} ({backend}): the host's cores "
               f"go to the workers, {DECODE_MS:g} ms decode : {POSTPROCESS_MS:g} ms "
               "postprocess per image")
    busy = pre + post + on_host * (threads or cpus) + 1    # + the front; 0: the library
                                                           # takes every core
    spinning = given.spinning if given.spinning is not None else busy <= cpus
    if given.spinning is None and not spinning:
        why += f"; {busy} busy threads share {cpus} CPU(s)"
    # a host executor that shares cores runs as SCHED_BATCH: waking, it does not preempt
    # the workers (the demo on 2 cores: e2e +2 %, its CPU per image -4 %)
    sched = given.sched or ("batch" if on_host and busy > cpus else "normal")
    flags = tuple(k for k, v in asdict(given).items() if v is not None)
    return Plan(pre, post, threads, 1, spinning, cpus, machine.affinity, machine.quota,
                backend, tuple(devices), flags, why, precision, choice, sched)


def _pool(cores: float, ms_per_image: float) -> int:
    """Workers for `cores` of CPU, at least one, no more than the front can keep busy."""
    cap = math.ceil(FRONT_IMG_S * ms_per_image / 1000)
    return max(1, min(cap, round(cores)))
