"""The front's registry of workers: who is heard, who has room, what postprocess is told."""

from __future__ import annotations

from pspnet.core import wire
from pspnet.daemon.workers import Worker, Workers


def beat(stage: str, index: int, pid: int, **fields: object) -> wire.Heartbeat:
    return wire.Heartbeat(stage, index, pid, {}, **fields)


def test_room_is_capacity_less_load_and_the_roomiest_is_picked():
    workers = Workers()
    for i, capacity in enumerate((8, 8)):
        workers.heard(f"executor-{i}-{100 + i}", "executor", i, 100 + i,
                      beat("executor", i, 100 + i, inputs=f"ipc:///r/exec{i}-in",
                           outputs=f"ipc:///r/exec{i}-out", capacity=capacity, batch=4),
                      True, 0.0)
    load = {"executor-0-100": 7, "executor-1-101": 2}
    assert workers.with_most_room("executor", load).name == "executor-1-101"
    load["executor-1-101"] = 8                      # full: the other one, with 1 left
    assert workers.with_most_room("executor", load).name == "executor-0-100"
    load["executor-0-100"] = 8
    assert workers.with_most_room("executor", load) is None


def with_room(workers: Workers, stage: str, load: dict[str, int],
              generation: int | None = None) -> list[tuple[int, Worker]]:
    """The plain answer `most_room` must give in one pass: (room, worker) of each worker
    that may be sent work and has room, most room first (sorted: ties in heard order)."""
    ready = [(w.capacity - load.get(w.name, 0), w) for w in workers._able(stage, generation)]
    return sorted([(room, w) for room, w in ready if room > 0], key=lambda rw: -rw[0])


def test_most_room_is_with_rooms_first_and_count_in_one_pass():
    """The front asks every turn: `most_room` answers as `with_room`'s head and length,
    ties to the first heard, without an address or unreachable left out, by generation."""
    workers = Workers()
    for i, capacity in enumerate((8, 6, 8, 8)):
        worker, _, _ = workers.heard(
            f"executor-{i}-{100 + i}", "executor", i, 100 + i,
            beat("executor", i, 100 + i, inputs="" if i == 3 else f"ipc:///r/exec{i}-in",
                 capacity=capacity), True, 0.0)
        worker.generation = i % 2
    for load in ({}, {"executor-0-100": 2}, {"executor-0-100": 8, "executor-2-102": 8},
                 {"executor-1-101": 1}):
        for gen in (None, 0, 1):
            listed = with_room(workers, "executor", load, gen)
            room, worker, count = workers.most_room("executor", load, gen)
            assert count == len(listed)
            assert (room, worker) == (listed[0] if listed else (0, None))


def test_an_executor_without_an_address_or_unreachable_gets_nothing():
    workers = Workers()
    workers.heard("executor-0-1", "executor", 0, 1, beat("executor", 0, 1, capacity=8),
                  True, 0.0)
    assert workers.with_most_room("executor", {}) is None      # no inputs address yet
    worker, new, moved = workers.heard(
        "executor-0-1", "executor", 0, 1,
        beat("executor", 0, 1, inputs="tcp://10.0.0.5:40001", capacity=8), True, 1.0)
    assert not new and moved and workers.with_most_room("executor", {}) is worker
    worker.reachable = False                                    # a send to it failed
    assert workers.with_most_room("executor", {}) is None


def test_a_new_life_is_a_new_worker_and_forget_removes_it():
    workers = Workers()
    _, new, _ = workers.heard("preprocess-0-10", "preprocess", 0, 10,
                              beat("preprocess", 0, 10, capacity=2), True, 0.0)
    assert new
    _, new, _ = workers.heard("preprocess-0-11", "preprocess", 0, 11,
                              beat("preprocess", 0, 11, capacity=2), True, 0.0)
    assert new and len(workers.of("preprocess")) == 2
    assert workers.forget("preprocess-0-10").pid == 10
    assert "preprocess-0-10" not in workers and workers.forget("preprocess-0-10") is None


def test_postprocess_is_told_every_executor_and_two_batches_of_credits_in_all():
    workers = Workers()
    workers.heard("executor-0-1", "executor", 0, 1,
                  beat("executor", 0, 1, inputs="ipc:///r/e0-in", outputs="ipc:///r/e0-out",
                       capacity=128, batch=64), True, 0.0)
    for i in range(4):
        workers.heard(f"postprocess-{i}-{10 + i}", "postprocess", i, 10 + i,
                      beat("postprocess", i, 10 + i), True, 0.0)
    peers = workers.peers()
    assert peers.executors == (("executor-0-1", "ipc:///r/e0-out"),)
    assert peers.credits == 32                      # 2 x 64 over 4 workers
    assert workers.peers(pool=8).credits == 16      # 8 expected, 4 heard so far


def test_the_first_postprocess_worker_heard_is_not_granted_the_whole_room():
    """Before: credits were shared over the workers heard so far, so the first one to
    start was told to ask for two batches on its own, and an executor choosing by room
    sent it everything while its peers idled."""
    workers = Workers()
    workers.heard("executor-0-1", "executor", 0, 1,
                  beat("executor", 0, 1, inputs="ipc:///r/e0-in", outputs="ipc:///r/e0-out",
                       capacity=32, batch=16), True, 0.0)
    workers.heard("postprocess-0-10", "postprocess", 0, 10, beat("postprocess", 0, 10),
                  True, 0.0)
    first = workers.peers(pool=2).credits
    workers.heard("postprocess-1-11", "postprocess", 1, 11, beat("postprocess", 1, 11),
                  True, 0.0)
    assert first == workers.peers(pool=2).credits == 16


def test_during_a_reload_each_model_is_routed_and_peered_within_itself():
    """Two generations (a live reload): the front dispatches within the active one, and a
    postprocess worker is told only its own model's executors (their outputs are that
    model's logits: its input size, its classes)."""
    workers = Workers()
    for gen, (index, pid) in enumerate(((0, 10), (1, 20))):
        for stage, extra in (("executor", {"inputs": f"ipc:///r/exec{index}-in",
                                           "outputs": f"ipc:///r/exec{index}-out",
                                           "batch": 4 * (gen + 1)}),
                             ("postprocess", {}), ("preprocess", {})):
            worker, _, _ = workers.heard(f"{stage}-{index}-{pid}", stage, index, pid,
                                         beat(stage, index, pid, capacity=8, **extra),
                                         True, 0.0)
            worker.generation = gen
    for gen, (index, pid) in enumerate(((0, 10), (1, 20))):
        assert [w.name for _, w in with_room(workers, "executor", {}, gen)] == \
            [f"executor-{index}-{pid}"]
        assert [w.name for _, w in with_room(workers, "preprocess", {}, gen)] == \
            [f"preprocess-{index}-{pid}"]
        peers = workers.peers(1, gen)
        assert peers.executors == ((f"executor-{index}-{pid}", f"ipc:///r/exec{index}-out"),)
        assert peers.credits == 8 * (gen + 1)            # two of its own batches
    assert len(with_room(workers, "executor", {})) == 2    # no generation: all of them
