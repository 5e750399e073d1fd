"""The postprocess worker's credits: one Credit per batch of outputs that arrived together,
each output's credit returned exactly once, and none held while nothing is waiting."""

from __future__ import annotations

import time
from types import SimpleNamespace

import zmq

from pspnet.core import wire
from pspnet.stages.postprocess import Inboxes


def _pair(ctx: zmq.Context, name: str) -> tuple[zmq.Socket, zmq.Socket]:
    executor = ctx.socket(zmq.ROUTER)      # outputs out, credits in (the executor's side)
    executor.bind(f"inproc://{name}")
    worker = ctx.socket(zmq.DEALER)        # credits out, outputs in (the worker's side)
    worker.setsockopt(zmq.IDENTITY, b"post")
    worker.connect(f"inproc://{name}")
    worker.send_multipart(wire.encode(wire.Credit(1)))      # introduces it to the ROUTER
    executor.recv_multipart()
    return executor, worker


def _credits(executor: zmq.Socket) -> list[int]:
    got = []
    while executor.poll(50):
        _, *frames = executor.recv_multipart()
        got.append(wire.decode_as(frames, wire.Credit).credits)
    return got


def _inboxes(ctx: zmq.Context, hold: int) -> Inboxes:
    control = ctx.socket(zmq.DEALER)       # stands for the worker's control socket
    inboxes = Inboxes(SimpleNamespace(control=control), 1 << 20)    # type: ignore[arg-type]
    inboxes.hold = hold
    return inboxes


def _outputs(executor: zmq.Socket, worker: zmq.Socket, n: int) -> None:
    for k in range(n):
        executor.send_multipart([b"post", b"output %d" % k])
    deadline = time.monotonic() + 5
    while not worker.getsockopt(zmq.EVENTS) & zmq.POLLIN and time.monotonic() < deadline:
        time.sleep(0.001)


def test_a_batch_of_outputs_is_credited_in_one_message_and_every_output_once() -> None:
    ctx = zmq.Context()
    try:
        executor, worker = _pair(ctx, "batch")
        inboxes = _inboxes(ctx, hold=4)
        _outputs(executor, worker, 4)          # a batch of 4 arrives together
        for _ in range(4):
            worker.recv_multipart()
            inboxes.done(worker)
        assert _credits(executor) == [4]
        _outputs(executor, worker, 6)          # more than half the grant: 4, then the rest
        for _ in range(6):
            worker.recv_multipart()
            inboxes.done(worker)
        assert _credits(executor) == [4, 2]
        _outputs(executor, worker, 1)          # a lone output: its credit at once
        worker.recv_multipart()
        inboxes.done(worker)
        assert _credits(executor) == [1]
        assert not inboxes.owed
    finally:
        ctx.destroy(linger=0)


def test_a_held_credit_is_returned_when_nothing_more_comes() -> None:
    """The loop's guard: held credits (more was waiting when the output was done) go back
    whenever the worker finds nothing waiting, so the executor never waits on them."""
    ctx = zmq.Context()
    try:
        executor, worker = _pair(ctx, "guard")
        inboxes = _inboxes(ctx, hold=8)
        _outputs(executor, worker, 3)
        worker.recv_multipart()
        inboxes.done(worker)                   # two more waiting: held
        assert _credits(executor) == [] and inboxes.owed == {worker: 1}
        inboxes.repay_all()
        assert _credits(executor) == [1] and not inboxes.owed
        for _ in range(2):
            worker.recv_multipart()
            inboxes.done(worker)
        assert _credits(executor) == [2]
    finally:
        ctx.destroy(linger=0)
