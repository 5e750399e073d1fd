"""The executor alone: one Executor on a thread, its front, preprocess and postprocess
played by the test's own sockets. Overlap of assembly and transfer with compute, partial
batches, a batch the device refuses, a device that keeps failing, stale images."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import zmq

from pspnet.core import wire
from pspnet.core.config import Addresses, PipelineConfig
from pspnet.core.trust import Trust, new_secret
from pspnet.model.manifest import Manifest
from pspnet.stages.executor import Executor, next_with_credit


class SlowBackend:
    """Upload costs `transfer_s`, execute `compute_s`: what the executor must overlap."""

    name, head = "slow", "labels"

    def __init__(self, batch: int, size: tuple[int, int], transfer_s: float, compute_s: float):
        self.batch_size, self.input_size = batch, size
        self.transfer_s, self.compute_s = transfer_s, compute_s
        self.execute_times_ms: list[float] = []
        self.device: dict[int, np.ndarray] = {}
        self.filled: list[int] = []           # real rows per uploaded batch

    def host_buffers(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        return (np.zeros((self.batch_size, *self.input_size, 3), np.uint8),
                np.zeros((self.batch_size, 4), np.int32))

    def upload(self, slot: int, images: np.ndarray, boxes: np.ndarray) -> None:
        time.sleep(self.transfer_s)
        self.device[slot] = boxes.copy()
        self.filled.append(int((boxes[:, 2] > 0).sum()))

    def launch(self, slot: int) -> None:
        pass                                  # a synchronous runtime: collect runs it

    def collect(self, slot: int) -> np.ndarray:
        time.sleep(self.compute_s)
        return np.zeros((self.batch_size, *self.input_size), np.uint8)

    def execute(self, slot: int) -> np.ndarray:
        return self.collect(slot)

    def close(self) -> None:
        pass


class ExecutorAlone:
    """One Executor on a thread, its peers played by this test's sockets: the front (a
    ROUTER its notes, errors and heartbeats reach), a preprocess worker (a PUSH to its
    images socket) and a postprocess worker (a DEALER asking for its outputs)."""

    def __init__(self, model_dir: Path, tmp_path: Path, backend: object, max_wait_ms: float,
                 credits: int = 1000, start: bool = True, **kwargs: object) -> None:
        """`start=False`: the executor starts reading at `start()`, so images sent before
        are all queued when it does (the work-conserving batcher runs what is queued: to
        test full batches, queue them first)."""
        from pspnet.stages.child import Child

        cfg = PipelineConfig(model_dir=model_dir, max_wait_ms=max_wait_ms, log_json=True,
                             run_dir=tmp_path)
        addrs = Addresses.for_config(cfg, tmp_path)
        ctx = zmq.Context.instance()
        self.front = ctx.socket(zmq.ROUTER)     # executor's notes, errors, heartbeats -> test
        self.front.bind(addrs.control)
        self.trust = Trust(new_secret())
        child = Child("executor", 0, cfg, addrs, self.trust, supervised=False)
        self.name = child.name
        self.executor = Executor(child, backend, **kwargs)  # type: ignore[arg-type]
        self.images = ctx.socket(zmq.PUSH)      # test (as preprocess) -> executor
        self.images.connect(child.inputs)
        self.outputs = ctx.socket(zmq.DEALER)   # executor -> test (as postprocess)
        self.outputs.setsockopt(zmq.IDENTITY, self.trust.identity("postprocess-0-1", "credits"))
        self.outputs.connect(child.outputs)
        self.outputs.send_multipart(wire.encode(wire.Credit(credits)))
        self.notes: list[wire.Message] = []
        self.pixels = np.zeros((*Manifest.read(model_dir).input_size, 3), np.uint8)
        if start:
            self.start()

    def start(self, settle_s: float = 0.0) -> None:
        time.sleep(settle_s)                    # let the images sent so far arrive (ipc)
        threading.Thread(target=self.executor.run, daemon=True).start()

    def send(self, i: int, to: str | None = None, token: str | None = None) -> None:
        """Image `i` as the front's preprocess would send it (with its token), or with
        `token` given."""
        place = wire.Placement(64, 64, 1.0, 0, 0, 64, 64)
        to = to or self.name
        token = self.trust.token(str(i), 0, to) if token is None else token
        self.images.send_multipart(wire.encode(wire.Image(
            wire.Request(str(i), "/x", token=token), place, to, self.pixels)))

    def output_ids(self, n: int) -> list[str]:
        return [wire.decode(self.outputs.recv_multipart()).request.id for _ in range(n)]

    def next_note(self, kind: type, timeout_s: float = 10) -> wire.Message:
        """The first note of this kind not yet taken (heartbeats come between)."""
        for i, message in enumerate(self.notes):
            if isinstance(message, kind):
                return self.notes.pop(i)
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.front.poll(max(0.0, deadline - time.monotonic()) * 1e3), kind
            message = wire.decode(self.front.recv_multipart()[1:])
            if isinstance(message, kind):
                return message
            self.notes.append(message)

    def errors(self, n: int) -> dict[str, str]:
        """The next `n` error answers (id -> message), skipping heartbeats and notes."""
        failed: dict[str, str] = {}
        while len(failed) < n:
            message = self.next_note(wire.Results)   # a batch's errors: one message
            failed.update((r.id, r.error or "") for r in message.each())
        return failed

    def control_notes(self, n: int, timeout_s: float = 10) -> list[wire.Message]:
        """The next `n` notes in the order they arrived, heartbeats left out."""
        notes: list[wire.Message] = []
        deadline = time.monotonic() + timeout_s
        while len(notes) < n:
            assert self.front.poll(max(0.0, deadline - time.monotonic()) * 1e3), notes
            message = wire.decode(self.front.recv_multipart()[1:])
            if not isinstance(message, wire.Heartbeat):
                notes.append(message)
        return notes

    def close(self) -> None:
        for sock in (self.images, self.outputs, self.front):
            sock.close(0)


def test_executor_overlaps_assembly_and_transfer_with_compute(tiny_models, tmp_path):
    """N batches take about N x compute, not N x (compute + transfer + assembly)."""
    manifest = Manifest.read(tiny_models["labels"])
    batch, n_batches, compute_s, transfer_s = 4, 8, 0.20, 0.12
    backend = SlowBackend(batch, manifest.input_size, transfer_s, compute_s)
    alone = ExecutorAlone(tiny_models["labels"], tmp_path, backend, max_wait_ms=1000,
                          start=False)
    for i in range(n_batches * batch):       # all queued at once: assembly is never waiting
        alone.send(i)
    alone.start(settle_s=0.5)
    started = time.perf_counter()
    got = alone.output_ids(n_batches * batch)
    elapsed = time.perf_counter() - started
    serial = n_batches * (compute_s + transfer_s)
    overlapped = n_batches * compute_s + transfer_s
    print(f"{n_batches} batches: {elapsed:.2f} s; overlapped ideal {overlapped:.2f} s, "
          f"serial {serial:.2f} s")
    assert sorted(got, key=int) == [str(i) for i in range(n_batches * batch)]
    assert elapsed < overlapped + 0.5 * (serial - overlapped)
    alone.close()


def test_an_executors_notes_come_in_order_each_id_taken_then_handed_once(tiny_models,
                                                                          tmp_path):
    """Control per batch (issue 27), in order from one socket (issue 25): every id is in
    one "handed" note, after the "took" that names it, if one does (several batches may
    share a note within a --coalesce-ms slice; ids taken and handed in one slice go in the
    "handed" alone, which implies the "took", and the slice's other "took" ids ride in the
    "handed" message), so a "handed" never overtakes its "took"."""
    manifest = Manifest.read(tiny_models["labels"])
    batch, n = 4, 12
    backend = SlowBackend(batch, manifest.input_size, 0.0, 0.05)
    alone = ExecutorAlone(tiny_models["labels"], tmp_path, backend, max_wait_ms=1000)
    for i in range(n):
        alone.send(i)
    alone.output_ids(n)
    took: list[str] = []
    handed: list[str] = []
    while len(handed) < n:
        (note,) = alone.control_notes(1)
        if isinstance(note, wire.Took):
            assert not set(note.ids) & set(handed), "a took after its handed"
            took.extend(note.ids)
        else:
            assert isinstance(note, wire.Handed) and note.to == "postprocess-0-1"
            assert not set(note.took) & set(handed), "a took after its handed"
            took.extend(note.took)                   # a slice's "took" riding in it
            handed.extend(note.ids)
    assert sorted(handed, key=int) == [str(i) for i in range(n)]   # each once
    assert len(set(took)) == len(took) and set(took) <= set(handed)
    alone.close()


class LaunchFailsOnce(SlowBackend):
    """The device refuses the second batch at launch (a CUDA error, say)."""

    launches = 0

    def launch(self, slot: int) -> None:
        self.launches += 1
        if self.launches == 2:
            raise RuntimeError("device refused the batch")


def test_a_batch_that_fails_to_launch_is_answered_and_the_executor_goes_on(tiny_models,
                                                                            tmp_path):
    manifest = Manifest.read(tiny_models["labels"])
    backend = LaunchFailsOnce(4, manifest.input_size, transfer_s=0.0, compute_s=0.05)
    alone = ExecutorAlone(tiny_models["labels"], tmp_path, backend, max_wait_ms=1000,
                          start=False)
    for i in range(12):                      # three full batches; the second fails
        alone.send(i)
    alone.start(settle_s=0.5)
    done: set[str] = set()
    failed: dict[str, str] = {}
    took: set[str] = set()
    handed: set[str] = set()
    deadline = time.monotonic() + 20
    while len(done) + len(failed) < 12:          # outputs and error answers, as they come
        assert time.monotonic() < deadline, (done, failed)
        if alone.outputs.poll(20):
            done.add(wire.decode(alone.outputs.recv_multipart()).request.id)
        while alone.front.poll(0):
            message = wire.decode(alone.front.recv_multipart()[1:])
            if isinstance(message, wire.Results | wire.Result):
                results = message.each() if isinstance(message, wire.Results) else (message,)
                failed.update((r.id, r.error or "") for r in results)
            elif isinstance(message, wire.Took):
                took.update(message.ids)
            elif isinstance(message, wire.Handed):
                took.update(message.took)            # a slice's "took" riding in it
                handed.update(message.ids)
    assert 1 <= len(failed) <= 4                 # the batch the device refused, however filled
    assert not done & set(failed) and done | set(failed) == {str(i) for i in range(12)}
    assert all("inference failed: device refused the batch" in e for e in failed.values())
    assert set(failed) <= took and not set(failed) & handed   # taken, never handed on
    alone.close()


class DeviceBroken(SlowBackend):
    """Every batch fails on collect, as after a CUDA error that poisons the context."""

    def collect(self, slot: int) -> np.ndarray:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_an_executor_whose_device_keeps_failing_gives_up_to_be_restarted(tiny_models,
                                                                          tmp_path):
    """Three failed batches in a row: every image answered with the error, then the
    executor gives up (in the daemon: exits, and the front restarts it)."""
    from pspnet.stages.executor import FAILED_IN_A_ROW_BEFORE_RESTART

    manifest = Manifest.read(tiny_models["labels"])
    reasons: list[str] = []
    alone = ExecutorAlone(tiny_models["labels"], tmp_path,
                          DeviceBroken(4, manifest.input_size, 0.0, 0.0), max_wait_ms=1000,
                          give_up=reasons.append, start=False)
    n = 4 * FAILED_IN_A_ROW_BEFORE_RESTART
    for i in range(n):
        alone.send(i)
    alone.start(settle_s=0.5)
    failed = alone.errors(n)
    assert all("inference failed: CUDA error" in e for e in failed.values())
    deadline = time.monotonic() + 10
    while not reasons and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(failed) == {str(i) for i in range(n)}
    assert len(reasons) == 1 and f"{FAILED_IN_A_ROW_BEFORE_RESTART} batches in a row" \
        in reasons[0] and "illegal memory access" in reasons[0]
    assert not alone.outputs.poll(100)          # nothing went downstream
    alone.close()


def test_an_idle_device_runs_a_lone_image_at_once_and_a_busy_one_keeps_filling(
        tiny_models, tmp_path):
    """Work-conserving: a lone image on an idle device runs at once, whatever max_wait
    (the old executor waited max_wait for companions: one batch of 0-3); while a batch runs
    the next fills, and runs the moment the device frees (not max_wait later)."""
    manifest = Manifest.read(tiny_models["labels"])
    backend = SlowBackend(4, manifest.input_size, transfer_s=0.0, compute_s=0.4)
    alone = ExecutorAlone(tiny_models["labels"], tmp_path, backend, max_wait_ms=5000)
    alone.send(0)                            # alone, device idle: runs now
    time.sleep(0.1)
    for i in range(1, 4):                    # trickle in while that batch runs
        alone.send(i)
        time.sleep(0.05)
    got = alone.output_ids(4)
    assert sorted(got, key=int) == [str(i) for i in range(4)]
    assert backend.filled == [1, 3], backend.filled
    alone.close()


def test_past_max_wait_a_partial_batch_queues_behind_the_running_one(tiny_models, tmp_path):
    """While the device is busy, max_wait bounds how long a partial batch waits for
    companions: past it, the batch is launched behind the running one."""
    manifest = Manifest.read(tiny_models["labels"])
    backend = SlowBackend(4, manifest.input_size, transfer_s=0.0, compute_s=0.4)
    alone = ExecutorAlone(tiny_models["labels"], tmp_path, backend, max_wait_ms=20)
    alone.send(0)                            # device idle: runs now
    time.sleep(0.1)
    for i in range(1, 5):                    # 1 waits 20 ms, then queues; 2-4 fill the next
        alone.send(i)
        time.sleep(0.05)
    alone.send(5)
    got = alone.output_ids(6)
    assert sorted(got, key=int) == [str(i) for i in range(6)]
    assert backend.filled == [1, 1, 4], backend.filled
    alone.close()


def test_executor_takes_only_images_meant_for_this_life_and_says_what_it_took(tiny_models,
                                                                               tmp_path):
    """An image addressed to a previous life of this executor (left in a preprocess
    worker's queue when it was restarted: the front has retried it already) is dropped; the
    others are taken, and the front hears which, batch by batch."""
    manifest = Manifest.read(tiny_models["labels"])
    backend = SlowBackend(4, manifest.input_size, transfer_s=0.0, compute_s=0.0)
    alone = ExecutorAlone(tiny_models["labels"], tmp_path, backend, max_wait_ms=1000,
                          start=False)
    alone.send(100, to="executor-0-1")            # stale: another pid
    for i in range(4):
        alone.send(i)
    alone.start(settle_s=0.5)
    assert sorted(alone.output_ids(4), key=int) == ["0", "1", "2", "3"]
    took = alone.next_note(wire.Took)
    handed = alone.next_note(wire.Handed)
    assert sorted(took.ids, key=int) == ["0", "1", "2", "3"]
    assert sorted(handed.ids, key=int) == ["0", "1", "2", "3"]
    assert handed.to == "postprocess-0-1"
    beat = alone.next_note(wire.Heartbeat, timeout_s=5)
    assert beat.inputs.startswith("ipc://") and beat.capacity == 8 and beat.batch == 4
    assert not alone.outputs.poll(300)           # the stale image never went out
    alone.close()


def test_executor_takes_pixels_only_with_their_token_and_credits_only_from_the_front(
        tiny_models, tmp_path):
    """Issue 23: forged pixels pushed to the executor under a victim's request id made 100
    of 200 masks the forger's, and a socket claiming 4096 credits on its output port was
    sent 93 outputs (paths and logits). Pixels without the token the front made for that
    request and this executor, or with one made for another executor or attempt, are
    dropped and counted; a peer whose identity the front's secret did not make is sent
    nothing, whatever name it takes."""
    manifest = Manifest.read(tiny_models["labels"])
    backend = SlowBackend(4, manifest.input_size, transfer_s=0.0, compute_s=0.0)
    alone = ExecutorAlone(tiny_models["labels"], tmp_path, backend, max_wait_ms=1000,
                          credits=4)
    thief = zmq.Context.instance().socket(zmq.DEALER)   # a forger asking for outputs
    thief.setsockopt(zmq.IDENTITY, b"postprocess-0-1")  # under the real worker's name
    thief.connect(alone.outputs.getsockopt_string(zmq.LAST_ENDPOINT))
    thief.send_multipart(wire.encode(wire.Credit(4096)))
    forger = Trust(new_secret())                        # a secret of its own
    alone.send(0, token="")                             # no token
    alone.send(1, token=forger.token("1", 0, alone.name))
    alone.send(2, token=alone.trust.token("2", 0, "executor-9-9"))   # another executor's
    alone.send(3, token=alone.trust.token("3", 1, alone.name))       # another attempt's
    for i in range(10, 14):
        alone.send(i)
    assert sorted(alone.output_ids(4), key=int) == ["10", "11", "12", "13"]
    assert not thief.poll(300) and not alone.outputs.poll(300)
    deadline = time.monotonic() + 5
    while True:                                         # the counts reach the heartbeat
        beat = alone.next_note(wire.Heartbeat, timeout_s=5)
        if beat.counters.get("forged_dropped", 0) >= 5 or time.monotonic() > deadline:
            break
    assert beat.counters["forged_dropped"] == 5 and beat.counters["processed"] == 4
    thief.close(0)
    alone.close()


def test_outputs_go_to_postprocess_workers_in_turn_not_to_the_one_with_most_credit():
    """Granted 32 and 16: equal turns while both have credit; one out of credit is passed
    over; a worker that left (popped) is not waited for."""
    credits = {b"p1": 32, b"p0": 16}
    order, last = [], None
    for _ in range(6):
        last = next_with_credit(credits, last)
        credits[last] -= 1
        order.append(last)
    assert order == [b"p1", b"p0"] * 3
    credits[b"p0"] = 0
    assert next_with_credit(credits, b"p1") == b"p1"
    del credits[b"p1"]
    credits[b"p0"] = 1
    assert next_with_credit(credits, b"p1") == b"p0"


def test_the_plans_batch_scheduling_reaches_the_threads_the_backend_starts(tiny_models,
                                                                           tmp_path):
    """core.plan schedules a host executor that shares its cores as SCHED_BATCH: set on
    the executor's thread before the backend opens, so the threads it starts (the
    runtime's pool, the runner) inherit it; `sched=normal` leaves it as it was."""
    import os
    from types import SimpleNamespace

    from pspnet.stages.executor import schedule

    def policies(options: dict[str, str]) -> tuple[int, int]:
        cfg = PipelineConfig(model_dir=tiny_models["logits"], backend="ort", devices=("cpu",),
                             backend_options=options, run_dir=tmp_path)
        seen: list[int] = []

        def executor_thread() -> None:                 # the policy is per thread (Linux)
            schedule(SimpleNamespace(log=None), cfg)   # type: ignore[arg-type]
            seen.append(os.sched_getscheduler(0))
            pool = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0)))
            pool.start()
            pool.join()

        thread = threading.Thread(target=executor_thread)
        thread.start()
        thread.join()
        return seen[0], seen[1]

    assert PipelineConfig(model_dir=tiny_models["logits"], backend="ort", devices=("cpu",),
                          run_dir=tmp_path).plan["executor_sched"] == "batch"
    assert policies({}) == (os.SCHED_BATCH, os.SCHED_BATCH)           # the plan's
    assert policies({"sched": "normal"}) == (os.SCHED_OTHER, os.SCHED_OTHER)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER                  # this thread: as it was
