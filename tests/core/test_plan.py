"""The process and thread plan (pspnet.core.plan) on faked machines, and how a config
takes it: a 16-core GPU host gets enough decode workers to keep a fast device busy; a
container's CPU quota is honoured over the affinity mask; an executor on the host's cores
gets a thread per core, with onnxruntime's spinning off; every flag overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from pspnet.core import plan as plans
from pspnet.core.config import PipelineConfig
from pspnet.core.plan import Given, Machine, cpu_quota, make_plan, read_machine

FAST_DEVICE_IMG_S = 1000      # an H200 runs PSPNet R50 fp16 at 700-1,250 img/s (batch 16+)


def affinity_of(n: int):
    return lambda pid: set(range(n))


def cgroup(tmp_path: Path, **files: str) -> Path:
    for name, text in files.items():
        path = tmp_path / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_a_16_core_gpu_host_gets_enough_workers_to_feed_a_fast_device(tmp_path):
    machine = read_machine(cgroup(tmp_path, **{"cpu.max": "max 100000"}), affinity_of(16))
    assert machine == Machine(16, None)
    p = make_plan(machine, "torch", ("cuda:0",))
    decode_img_s = p.preprocess_workers * 1000 / plans.DECODE_MS
    post_img_s = p.postprocess_workers * 1000 / plans.POSTPROCESS_MS
    print(f"\nFIGURE plan, 16 cores + cuda:0: {plans.describe(p.as_dict())}")
    assert decode_img_s >= 2 * FAST_DEVICE_IMG_S and post_img_s >= 2 * FAST_DEVICE_IMG_S
    # no oversubscription: workers + the executor's loop + the front fit the cores
    assert p.preprocess_workers + p.postprocess_workers + 1 + 1 <= 16
    assert p.spinning and p.executor_threads == 1
    # the old fixed 2 + 2 would feed only 1,000 decodes/s
    assert p.preprocess_workers > 2


def test_a_container_quota_is_honoured_over_the_affinity_mask(tmp_path):
    v2 = read_machine(cgroup(tmp_path / "v2", **{"cpu.max": "200000 100000\n"}),
                      affinity_of(16))
    v1 = read_machine(cgroup(tmp_path / "v1", **{"cpu__cpu.cfs_quota_us": "150000",
                                                 "cpu__cpu.cfs_period_us": "100000"}),
                      affinity_of(16))
    assert (v2.quota, v2.cpus) == (2.0, 2) and (v1.quota, v1.cpus) == (1.5, 1)
    assert cpu_quota(cgroup(tmp_path / "none", **{"cpu__cpu.cfs_quota_us": "-1",
                                                  "cpu__cpu.cfs_period_us": "100000"})) is None
    assert cpu_quota(tmp_path / "missing") is None
    assert Machine(4, 8.0).cpus == 4                       # the smaller wins either way
    on_16 = make_plan(Machine(16), "ort", ("cpu",))
    capped = make_plan(v2, "ort", ("cpu",))
    print(f"\nFIGURE plan, 16 cores, cpu.max 200000 100000: {plans.describe(capped.as_dict())}")
    assert capped.cpus == 2 and "quota 2" in capped.why
    assert (capped.preprocess_workers, capped.postprocess_workers,
            capped.executor_threads) == (1, 1, 2)
    assert on_16.executor_threads > capped.executor_threads


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 8, 16, 64])
def test_a_host_executor_gets_a_thread_per_core_that_sleeps_while_idle(cores):
    p = make_plan(Machine(cores), "ort", ("cpu",))
    workers = p.preprocess_workers + p.postprocess_workers
    assert p.preprocess_workers >= 1 and p.postprocess_workers >= 1
    assert workers <= max(2, cores // 4)           # the network is most of the work
    assert p.executor_threads == cores
    # the workers share the cores with it: its idle threads must not spin
    assert not p.spinning
    if cores == 2:
        print(f"\nFIGURE plan, 2 cores, ort on cpu: {plans.describe(p.as_dict())}")
        assert (p.preprocess_workers, p.postprocess_workers, p.executor_threads,
                p.spinning) == (1, 1, 2, False)


@pytest.mark.parametrize("machine, backend, devices, sched", [
    (Machine(2), "ort", ("cpu",), "batch"),          # the workers share its cores
    (Machine(16), "torch", ("cpu", "cpu"), "batch"),
    (Machine(16), "torch", ("cuda:0",), "normal"),   # its loop feeds a device: no
    (Machine(2), "sim", ("cpu",), "normal"),         # a simulated device computes nothing
])
def test_a_host_executor_sharing_cores_is_scheduled_as_batch(machine, backend, devices,
                                                             sched):
    p = make_plan(machine, backend, devices)
    assert p.executor_sched == sched
    assert ("scheduled as batch" in plans.describe(p.as_dict())) == (sched == "batch")
    mine = make_plan(machine, backend, devices, Given(sched="normal"))   # the flag wins
    assert mine.executor_sched == "normal" and "sched" in mine.set_by_flags


def test_two_host_executors_share_the_executor_cores():
    p = make_plan(Machine(16), "torch", ("cpu", "cpu"))
    assert p.executor_threads == 8 and not p.spinning


def test_a_simulated_device_is_not_a_host_executor():
    p = make_plan(Machine(16), "sim", ("cpu",))
    assert plans.host_executors("sim", ("cpu",)) == 0
    assert p.preprocess_workers > 2 and p.executor_threads == 1


def test_pools_stop_at_what_the_front_can_feed():
    p = make_plan(Machine(256), "torch", ("cuda:0",))
    one_more = 1000 / plans.DECODE_MS            # what one worker past the ceiling adds
    assert p.preprocess_workers * 1000 / plans.DECODE_MS < plans.FRONT_IMG_S + one_more
    assert p.postprocess_workers < 32


def test_flags_override_the_plan_and_are_named():
    p = make_plan(Machine(2), "ort", ("cpu",),
                  Given(preprocess_workers=3, executor_threads=2, spinning=True))
    assert (p.preprocess_workers, p.postprocess_workers, p.executor_threads,
            p.spinning) == (3, 1, 2, True)
    assert p.set_by_flags == ("preprocess_workers", "executor_threads", "spinning")
    assert "set by flags: preprocess_workers" in plans.describe(p.as_dict())


def test_a_config_is_planned_where_flags_left_it_open(tmp_path):
    planned = PipelineConfig(model_dir=tmp_path)
    assert None not in (planned.preprocess_workers, planned.postprocess_workers,
                        planned.executor_threads, planned.executor_spin)
    assert planned.plan["cpus"] == plans.this_machine().cpus
    given = PipelineConfig(model_dir=tmp_path, preprocess_workers=5,
                           backend_options={"threads": "3", "spin": "1"})
    assert given.preprocess_workers == 5 and given.executor_threads == 3
    assert given.executor_spin is True
    assert set(given.plan["set_by_flags"]) == {"preprocess_workers", "executor_threads",
                                               "spinning"}
    # a child's copy keeps the plan as the front made it
    assert PipelineConfig.from_json(planned.to_json()) == planned


def test_the_executor_gets_the_plan_only_where_its_backend_takes_it(tmp_path):
    ort = PipelineConfig(model_dir=tmp_path, executor_threads=2, executor_spin=False)
    assert ort.executor_options() == {"threads": "2", "spin": "0"}
    mine = PipelineConfig(model_dir=tmp_path, executor_threads=2, executor_spin=False,
                          backend_options={"threads": "1"})
    assert mine.executor_options() == {"threads": "1", "spin": "0"}      # the user's wins
    torch = PipelineConfig(model_dir=tmp_path, backend="torch", executor_threads=2,
                           executor_spin=False)
    assert torch.executor_options() == {"threads": "2"}               # no spinning to set
    sim = PipelineConfig(model_dir=tmp_path, backend="sim", executor_threads=2,
                         executor_spin=False, backend_options={"img_s": "50"})
    assert sim.executor_options() == {"img_s": "50"}


def test_threads_0_leaves_the_executor_threads_to_the_library(tmp_path):
    """--backend-option threads=0: onnxruntime's own choice (every core), as before the
    plan; the plan then counts every core as the executor's."""
    p = make_plan(Machine(4), "ort", ("cpu",), Given(executor_threads=0))
    assert p.executor_threads == 0 and not p.spinning
    assert "executor threads the library default" in plans.describe(p.as_dict())
    cfg = PipelineConfig(model_dir=tmp_path, backend_options={"threads": "0"})
    assert cfg.executor_threads == 0 and cfg.executor_options()["threads"] == "0"
